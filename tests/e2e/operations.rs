//! Operations (SPEC §1, §3.5–3.6, §5.4, §7): metrics, health, statsd, status, logging,
//! reload, daemon mode, Sentry, the built-in ticker.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test]
async fn metrics_status_and_health_follow_the_relay() {
    let mut queue = PgQueue::create("ops_metrics").await;
    let mut sink = Sink::topic("ops_metrics").await;
    let port = free_port();
    let mut relay = Relay::start(&with_http(config_yaml(&[worker_yaml(&queue.name, "")]), port));
    assert_eq!(wait_http(port, "/livez", 200).await, "ok\n");
    wait_http(port, "/readyz", 200).await;

    let events: Vec<NewEvent> = (0..25)
        .map(|i| NewEvent::to(&sink.exchange, "k", &i.to_string()))
        .collect();
    queue.insert_batch(&events).await;
    sink.take(25).await;
    queue.wait_drained().await;
    let text = eventually("processed to reach 25 in /metrics", || async {
        let (_, text) = http_get(port, "/metrics").await?;
        (metric(&text, "mikkoo_processed_total", &queue.name) == Some(25.0)).then_some(text)
    })
    .await;
    assert!(metric(&text, "mikkoo_batches_total", &queue.name).unwrap() >= 1.0);
    assert_eq!(metric(&text, "mikkoo_in_flight", &queue.name), Some(0.0));
    assert!(metric(&text, "mikkoo_confirm_latency_seconds_count", &queue.name).unwrap() >= 25.0);
    assert!(metric(&text, "mikkoo_batch_size_sum", &queue.name).unwrap() >= 25.0);
    assert!(text.contains(&format!(
        "mikkoo_connected{{queue=\"{}\",server=\"rabbitmq\"}} 1",
        queue.name
    )));
    assert!(!text.contains(&sink.exchange), "no exchange names as labels");

    let (status, body) = http_get(port, "/status").await.unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let worker = &json["workers"][0];
    assert_eq!(worker["queue"], queue.name.as_str());
    assert_eq!(worker["role"], "active");
    assert_eq!(worker["ready"], true);
    assert_eq!(worker["counters"]["processed"], 25);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn readyz_goes_red_while_the_broker_is_unreachable() {
    let _queue_guard = PgQueue::create("ops_ready_broker").await;
    let queue = _queue_guard.name.clone();
    let mut proxy = faults::Proxy::reserved("127.0.0.1:5672").await;
    let port = free_port();
    let worker = worker_yaml_via(&queue, "", &format!("host: 127.0.0.1, port: {}", proxy.port));
    let mut relay = Relay::start(&with_http(config_yaml(&[worker]), port));
    // Once the first attempt failed, the reason says why.
    let wanted = format!(
        "{queue}: not connected to RabbitMQ: cannot connect to RabbitMQ at 127.0.0.1:{}",
        proxy.port
    );
    let reason = eventually("/readyz to name the unreachable broker", || async {
        http_get(port, "/readyz")
            .await
            .filter(|(status, body)| *status == 503 && body.contains(&wanted))
            .map(|(_, body)| body)
    })
    .await;
    assert!(
        reason.contains("cannot connect to RabbitMQ"),
        "the reason says why: {reason}"
    );
    proxy.start().await;
    wait_http(port, "/readyz", 200).await;
    assert_eq!(wait_http(port, "/livez", 200).await, "ok\n");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn readyz_goes_red_when_a_worker_stalls() {
    let queue = PgQueue::create("ops_stall").await;
    let port = free_port();
    let mut relay = Relay::start(&with_http(config_yaml(&[worker_yaml(&queue.name, "")]), port));
    wait_http(port, "/readyz", 200).await;
    // Hold the consumer's subscription row: pgq.next_batch blocks behind the lock, so
    // the worker makes no progress although both connections are up.
    let lock = queue.lock_subscription().await;
    queue.tick().await;
    let reason = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some((503, body)) = http_get(port, "/readyz").await {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("/readyz turns red within the progress deadline (30 s)");
    assert!(reason.contains("no progress for"), "{reason}");
    lock.release().await;
    wait_http(port, "/readyz", 200).await;
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn statsd_lines_arrive_over_udp_and_tcp() {
    let mut queue = PgQueue::create("ops_statsd").await;
    let mut sink = Sink::topic("ops_statsd").await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let statsd = |port: u16, extra: &str| {
        format!("  statsd: {{enabled: true, host: 127.0.0.1, port: {port}, prefix: relay{extra}}}\n")
    };
    let config = config_yaml(&[worker_yaml(&queue.name, "")]);
    let mut udp_relay = Relay::start(&format!("{config}{}", statsd(udp_port, "")));
    queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "k", "one"),
            NewEvent::to(&sink.exchange, "k", "two"),
        ])
        .await;
    sink.take(2).await;
    let expected = format!("relay.{}.counters.processed:2|c", queue.name);
    let lines = eventually("the processed counter over UDP", || async {
        let mut buffer = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(2), udp.recv(&mut buffer))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
        text.lines().any(|l| l == expected).then_some(text)
    })
    .await;
    assert!(
        lines
            .lines()
            .all(|l| l.starts_with(&format!("relay.{}.", queue.name))),
        "{lines}"
    );
    assert!(lines.contains(".gauges.in_flight:0|g"), "{lines}");
    assert!(udp_relay.stop().await.success());

    let mut tcp_relay = Relay::start(&format!(
        "{config}{}",
        statsd(tcp_port, ", protocol: tcp, include_hostname: true")
    ));
    let (stream, _) = tokio::time::timeout(DEADLINE, tcp.accept())
        .await
        .unwrap()
        .unwrap();
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "three")])
        .await;
    sink.take(1).await;
    let mut reader = tokio::io::BufReader::new(stream).lines();
    let host = mikkoo::host::fqdn().replace('.', "_");
    let wanted = format!("relay.{host}.{}.counters.processed:1|c", queue.name);
    let found = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = reader.next_line().await {
            if line == wanted {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(found, "no {wanted:?} over TCP");
    assert!(tcp_relay.stop().await.success());
}

#[tokio::test]
async fn status_reports_a_registered_queue_with_pending_events() {
    let mut queue = PgQueue::create("ops_status").await;
    queue
        .insert_batch(&[
            NewEvent::to("nowhere", "k", "a"),
            NewEvent::to("nowhere", "k", "b"),
        ])
        .await;
    queue.tick().await;
    let (_dir, path) = write_config(&config_yaml(&[
        worker_yaml(&queue.name, ""),
        worker_yaml(&unique("absent"), ""),
    ]));
    let path = path.to_str().unwrap().to_owned();
    let (status, table, stderr) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || run_cli(&["status", "-c", &path]))
            .await
            .unwrap()
    };
    assert!(status.success(), "{stderr}");
    let row = table
        .lines()
        .find(|line| line.starts_with(&queue.name))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" yes "), "{row}");
    assert!(table.contains("no queue"), "{table}");
    let (status, json, _) = tokio::task::spawn_blocking(move || run_cli(&["status", "-c", &path, "--json"]))
        .await
        .unwrap();
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let entry = json["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == queue.name.as_str())
        .unwrap();
    assert_eq!(entry["registered"], true);
    // PgQ's own estimate, from event sequence numbers at the ticks.
    assert!(entry["pending_events"].as_i64().unwrap() >= 1, "{entry}");
    assert!(entry["lag_seconds"].as_f64().is_some());
    assert!(entry["ticker_lag_seconds"].as_f64().is_some());
    assert!(entry["open_batch"].is_null());
}

#[tokio::test]
async fn sighup_adds_removes_and_changes_workers_and_refuses_a_bad_file() {
    let mut kept = PgQueue::create("ops_hup_kept").await;
    let mut added = PgQueue::create("ops_hup_added").await;
    let mut removed = PgQueue::create("ops_hup_removed").await;
    let mut sink = Sink::topic("ops_hup").await;
    let mut relay = Relay::start(&config_yaml(&[
        worker_yaml(&kept.name, ""),
        worker_yaml(&removed.name, ""),
    ]));
    removed
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "removed-before")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "removed-before");

    let changed = config_yaml(&[
        worker_yaml(&kept.name, "app_id: changed-app"),
        worker_yaml(&added.name, ""),
    ]);
    std::fs::write(&relay.config_path, &changed).unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_for_log("queue removed from the configuration").await;
    relay.wait_for_log("worker settings changed; restarting it").await;
    added
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "added")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "added");
    kept.insert_batch(&[NewEvent::to(&sink.exchange, "k", "kept")])
        .await;
    let delivery = sink.take(1).await.remove(0);
    assert_eq!(body(&delivery), "kept");
    assert_eq!(
        delivery.properties.app_id().as_ref().map(|a| a.as_str()),
        Some("changed-app")
    );
    removed
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "removed-after")])
        .await;

    std::fs::write(&relay.config_path, "Application: {workers: [not, a, mapping]}\n").unwrap();
    relay.signal(Signal::SIGHUP);
    relay
        .wait_for_log("configuration reload refused; running unchanged")
        .await;
    kept.insert_batch(&[NewEvent::to(&sink.exchange, "k", "still-running")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "still-running");
    assert!(
        sink.drain_now().iter().all(|d| body(d) != "removed-after"),
        "the removed queue is not relayed"
    );
    assert!(relay.stop().await.success());
}

/// The consumer's subscription row id: registering again after an unregister makes a
/// new one.
async fn subscription_id(queue: &PgQueue) -> Option<i32> {
    let row = queue
        .client
        .query_opt(
            "SELECT s.sub_id FROM pgq.subscription s JOIN pgq.queue q ON q.queue_id = s.sub_queue \
             JOIN pgq.consumer c ON c.co_id = s.sub_consumer WHERE q.queue_name = $1 AND c.co_name = $2",
            &[&queue.name, &queue.consumer],
        )
        .await
        .unwrap();
    row.map(|row| row.get(0))
}

#[tokio::test]
async fn sighup_restarting_a_worker_with_unregister_true_keeps_its_consumer_registered() {
    let mut queue = PgQueue::create("ops_hup_unreg").await;
    let mut sink = Sink::topic("ops_hup_unreg").await;
    let port = free_port();
    let name = queue.name.clone();
    let with_settings = |extra: &str| with_http(config_yaml(&[worker_yaml(&name, extra)]), port);
    let mut relay = Relay::start(&with_settings("unregister: true"));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "before")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "before");
    let registered = subscription_id(&queue).await.expect("registered");

    std::fs::write(
        &relay.config_path,
        with_settings("unregister: true\napp_id: changed-app"),
    )
    .unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_for_log("worker settings changed; restarting it").await;
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "after")])
        .await;
    let delivery = sink.take(1).await.remove(0);
    assert_eq!(body(&delivery), "after");
    assert_eq!(
        delivery.properties.app_id().as_ref().map(|a| a.as_str()),
        Some("changed-app"),
        "the restarted worker relayed it"
    );
    assert_eq!(
        subscription_id(&queue).await,
        Some(registered),
        "the consumer was never unregistered, so PgQ kept every event for it"
    );
    let log = relay.log();
    assert!(
        log.contains("the pgq consumer stays registered") && !log.contains("unregistered pgq consumer"),
        "{log}"
    );
    // The confirm that counts the second event may come just after its delivery.
    eventually("counters to go on across the restart", || async {
        let (_, text) = http_get(port, "/metrics").await?;
        (metric(&text, "mikkoo_processed_total", &queue.name)? == 2.0).then_some(())
    })
    .await;

    // Another consumer is another subscription: the old one is left for good.
    std::fs::write(
        &relay.config_path,
        with_settings("unregister: true\napp_id: changed-app\nconsumer_name: other_consumer"),
    )
    .unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_for_log("unregistered pgq consumer").await;
    assert!(!queue.is_registered().await, "the old consumer was unregistered");
    // PgQ gives a new consumer the events after its registration only.
    eventually("the new consumer to register", || async {
        (other_consumers(&queue).await == 1).then_some(())
    })
    .await;
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "to-the-new-consumer")])
        .await;
    assert_eq!(
        body(&sink.take(1).await[0]),
        "to-the-new-consumer",
        "the new consumer is registered and relays"
    );

    assert!(relay.stop().await.success());
    assert_eq!(
        other_consumers(&queue).await,
        0,
        "a stop for good still unregisters"
    );
}

/// The relay's PostgreSQL sessions for `queue`, and how many of them wait on a lock.
async fn relay_sessions(queue: &PgQueue) -> (i64, i64) {
    let row = queue
        .client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock') \
             FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("mikkoo {}", queue.name)],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_queue_added_back_waits_for_its_old_worker_to_stop() {
    let mut queue = PgQueue::create("ops_hup_back").await;
    let mut sink = Sink::topic("ops_hup_back").await;
    // Not exclusive: nothing but the supervisor keeps two workers of the queue apart.
    let with_queue = config_yaml(&[worker_yaml(&queue.name, "exclusive: false")]);
    let mut relay = Relay::start(&with_queue);
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "first")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "first");

    // The worker gets stuck in next_batch behind a lock on its subscription.
    let lock = queue.lock_subscription().await;
    eventually("the worker to wait on the lock", || async {
        (relay_sessions(&queue).await == (1, 1)).then_some(())
    })
    .await;
    std::fs::write(
        &relay.config_path,
        "Application:\n  poll_interval: 1\n  workers: {}\n",
    )
    .unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_for_log("queue removed from the configuration").await;
    std::fs::write(&relay.config_path, &with_queue).unwrap();
    relay.signal(Signal::SIGHUP);
    eventually("the queue to be added back", || async {
        (relay.log().matches("worker started").count() == 2).then_some(())
    })
    .await;
    // A bounded look: a new worker that did not wait would connect within milliseconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(
            relay_sessions(&queue).await.0,
            1,
            "a second worker of the queue connected while the old one was still stopping"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    lock.release().await;
    relay.wait_for_log("worker stopped").await;
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "after")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "after");
    assert!(relay.stop().await.success());
}

/// How many consumers named `other_consumer` `queue` has (0 or 1).
async fn other_consumers(queue: &PgQueue) -> i64 {
    queue
        .client
        .query_one(
            "SELECT count(*) FROM pgq.get_consumer_info($1) WHERE consumer_name = 'other_consumer'",
            &[&queue.name],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn sighup_applies_log_level_changes() {
    let queue = PgQueue::create("ops_hup_levels").await;
    let logging = |level: &str| {
        format!(
            "Logging:\n  handlers:\n    console: {{class: logging.StreamHandler}}\n  loggers:\n    \
             mikkoo: {{level: {level}, handlers: [console]}}\n  root: {{level: WARNING, handlers: [console]}}\n"
        )
    };
    let workers = config_yaml(&[worker_yaml(&queue.name, "")]);
    let mut relay = Relay::start_with_configured_levels(&format!("{workers}{}", logging("WARNING")));
    eventually("the worker to connect", || async {
        let row = queue
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&format!("mikkoo {}", queue.name)],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 1).then_some(())
    })
    .await;
    assert!(
        !relay.log().contains(" INFO "),
        "at WARNING no info line is written: {}",
        relay.log()
    );
    std::fs::write(&relay.config_path, format!("{workers}{}", logging("INFO"))).unwrap();
    relay.signal(Signal::SIGHUP);
    // The status line every poll_interval (1 s here) is an info line.
    relay.wait_for_log(" INFO mikkoo::worker: status").await;
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn sigusr1_logs_a_status_line_per_worker() {
    let queue = PgQueue::create("ops_usr1").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    relay.wait_for_log("connected to rabbitmq").await;
    relay.signal(Signal::SIGUSR1);
    relay.wait_for_log("status (SIGUSR1)").await;
    assert!(
        relay
            .log()
            .lines()
            .any(|l| l.contains("status (SIGUSR1)") && l.contains(&queue.name))
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn json_log_format_writes_one_object_per_line() {
    let queue = PgQueue::create("ops_json").await;
    let mut relay = Relay::start_with(
        &config_yaml(&[worker_yaml(&queue.name, "")]),
        &["--log-format", "json"],
    );
    relay.wait_for_log("connected to rabbitmq").await;
    assert!(relay.stop().await.success());
    let log = relay.log();
    assert!(log.lines().count() >= 3);
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["message"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test]
async fn logging_section_handlers_write_to_a_file_and_to_syslog() {
    let queue = PgQueue::create("ops_handlers").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mikkoo.log");
    let syslog = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    syslog.set_read_timeout(Some(DEADLINE)).unwrap();
    let logging = format!(
        "Logging:\n  version: 1\n  handlers:\n    file:\n      class: logging.FileHandler\n      filename: {}\n    \
         syslog:\n      class: logging.handlers.SysLogHandler\n      address: [127.0.0.1, {}]\n      facility: daemon\n  \
         loggers:\n    mikkoo:\n      level: INFO\n      handlers: [file, syslog]\n  root:\n    level: WARNING\n",
        file.display(),
        syslog.local_addr().unwrap().port()
    );
    let mut relay = Relay::start(&format!(
        "{}{logging}",
        config_yaml(&[worker_yaml(&queue.name, "")])
    ));
    relay.wait_for_log("connected to rabbitmq").await;
    let mut buffer = vec![0u8; 4096];
    let n = syslog.recv(&mut buffer).unwrap();
    let datagram = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(
        datagram.starts_with("<30>mikkoo[") || datagram.starts_with("<27>") || datagram.starts_with("<28>"),
        "{datagram}"
    );
    assert!(relay.stop().await.success());
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains("connected to rabbitmq"), "{written}");
}

/// A configuration that detaches, with a pidfile and a log file in `dir`.
fn daemon_config(queue: &str, dir: &Path, daemon_extra: &str) -> String {
    format!(
        "{}Daemon:\n  pidfile: {}\n{daemon_extra}Logging:\n  handlers:\n    file: {{class: logging.FileHandler, filename: {}}}\n  \
         root: {{level: INFO, handlers: [file]}}\n",
        config_yaml(&[worker_yaml(queue, "")]),
        dir.join("mikkoo.pid").display(),
        dir.join("mikkoo.log").display()
    )
}

/// Launches `mikkoo -c config_path` (no `-f`), asserts the launching process exits 0,
/// and returns the daemon's pid once its pidfile names it and it has connected.
async fn launch_daemon(config_path: &Path, dir: &Path) -> DaemonGuard {
    let path = config_path.to_str().unwrap().to_owned();
    let (status, _, stderr) = tokio::task::spawn_blocking(move || run_cli(&["-c", &path]))
        .await
        .unwrap();
    assert!(
        status.success(),
        "the launching process exits 0 once the daemon runs: {stderr}"
    );
    let pidfile = dir.join("mikkoo.pid");
    let pid: i32 = eventually("the pidfile", || async {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .await;
    let daemon = DaemonGuard(nix::unistd::Pid::from_raw(pid));
    assert!(is_running(daemon.0), "the pidfile names a live process");
    eventually("the daemon to connect", || async {
        std::fs::read_to_string(dir.join("mikkoo.log"))
            .ok()?
            .contains("connected to rabbitmq")
            .then_some(())
    })
    .await;
    daemon
}

fn is_running(pid: nix::unistd::Pid) -> bool {
    nix::sys::signal::kill(pid, None).is_ok()
}

#[tokio::test]
async fn daemon_mode_writes_the_pidfile_refuses_a_live_one_and_removes_it() {
    let queue = PgQueue::create("ops_daemon").await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("mikkoo.pid");
    let (_config_dir, path) = write_config(&daemon_config(&queue.name, dir.path(), ""));
    let guard = launch_daemon(&path, dir.path()).await;
    let daemon = guard.0;

    let (status, _, stderr) = run_cli(&["-c", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("names running process") || stderr.contains("already running"),
        "{stderr}"
    );

    nix::sys::signal::kill(daemon, Signal::SIGTERM).unwrap();
    eventually("the daemon to exit and remove its pidfile", || async {
        (!pidfile.exists() && !is_running(daemon)).then_some(())
    })
    .await;
}

/// The `Uid:`, `Gid:` or `Groups:` line of a process's `/proc` status, without its name.
fn proc_status_line(pid: nix::unistd::Pid, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"));
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn daemon_mode_drops_to_the_configured_user_and_its_groups_and_still_relays() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "dropping privileges needs the tests to run as root, as scripts/test does"
    );
    let mut queue = PgQueue::create("ops_daemon_user").await;
    let mut sink = Sink::topic("ops_daemon_user").await;
    // The directory stays root's, 0700: the daemon, once `nobody`, can neither remove
    // its pidfile (it must empty it instead) nor look up its log file (it must go on
    // writing to the one it opened as root).
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let pidfile = dir.path().join("mikkoo.pid");
    let config = daemon_config(&queue.name, dir.path(), "  user: nobody\n  group: nogroup\n");
    let (_config_dir, path) = write_config(&config);
    let guard = launch_daemon(&path, dir.path()).await;
    let daemon = guard.0;

    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap().gid;
    assert_eq!(
        proc_status_line(daemon, "Uid"),
        vec![nobody.to_string(); 4].join(" ")
    );
    assert_eq!(
        proc_status_line(daemon, "Gid"),
        vec![nogroup.to_string(); 4].join(" ")
    );
    assert_eq!(
        proc_status_line(daemon, "Groups"),
        nogroup.to_string(),
        "root's supplementary groups are gone"
    );
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "as-nobody")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "as-nobody");

    nix::sys::signal::kill(daemon, Signal::SIGTERM).unwrap();
    eventually("the daemon to exit and empty its pidfile", || async {
        let left = std::fs::read_to_string(&pidfile).ok()?;
        (left.is_empty() && !is_running(daemon)).then_some(())
    })
    .await;
    let log = std::fs::read_to_string(dir.path().join("mikkoo.log")).unwrap();
    assert!(log.contains("pidfile emptied, not removed"), "{log}");
}

/// A minimal HTTP endpoint that answers 200 and keeps what it was sent.
async fn fake_sentry() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = vec![0u8; 65536];
                // Read headers, then as much body as Content-Length says.
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = sender.send(String::from_utf8_lossy(&request).into_owned());
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}",
                    )
                    .await;
            });
        }
    });
    (port, receiver)
}

#[tokio::test]
async fn errors_are_reported_to_sentry_without_secrets() {
    let queue = PgQueue::create("ops_sentry").await;
    let (port, mut reports) = fake_sentry().await;
    let worker = worker_yaml_via(
        &queue.name,
        "",
        "host: 127.0.0.1, port: 1, password: hunter2-secret",
    );
    let config = format!(
        "{}  sentry_dsn: http://publickey@127.0.0.1:{port}/42\n",
        config_yaml(&[worker])
    );
    let mut relay = Relay::start(&config);
    let report = tokio::time::timeout(DEADLINE, async {
        loop {
            let request = reports.recv().await.unwrap();
            if request.contains("worker failed; reconnecting") {
                return request;
            }
        }
    })
    .await
    .expect("an error report reaches the Sentry endpoint");
    assert!(
        report.starts_with("POST /api/42/envelope/"),
        "{}",
        &report[..report.len().min(200)]
    );
    assert!(!report.contains("hunter2-secret"));
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn the_built_in_ticker_relays_and_brings_retries_back_without_pgqd() {
    // A database of its own: pgqd looks for new databases only every 60 s, so within
    // this test every tick and retry there is the built-in ticker's doing.
    let admin = pg().await;
    let database = unique("ticker_db");
    admin
        .execute(&format!("CREATE DATABASE {database}"), &[])
        .await
        .unwrap();
    let url = format!("postgresql://postgres@127.0.0.1:5432/{database}");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    client.batch_execute("CREATE EXTENSION pgq").await.unwrap();
    let queue = "ticked";
    client
        .execute("SELECT pgq.create_queue($1)", &[&queue])
        .await
        .unwrap();
    client
        .execute("SELECT pgq.register_consumer($1, 'mikkoo')", &[&queue])
        .await
        .unwrap();
    client
        .execute(
            "SELECT pgq.set_queue_config($1, 'ticker_max_lag', '0.1')",
            &[&queue],
        )
        .await
        .unwrap();
    let mut sink = Sink::bound("ticker", &["routed"]).await;
    let worker = worker_yaml(queue, "max_failures: 1").replace(PG_URL, &url);
    let config = format!(
        "{}  ticker: {{enabled: true, period: 200ms}}\n",
        config_yaml(&[worker])
    );
    let mut relay = Relay::start(&config);
    relay.wait_for_log("ticking pgq").await;
    for (routing_key, body) in [("routed", "ticked-by-mikkoo"), ("unrouted", "comes-back")] {
        client
            .execute(
                "SELECT pgq.insert_event($1, $2, $3, $4, NULL, NULL, NULL)",
                &[&queue, &routing_key, &body, &sink.exchange],
            )
            .await
            .unwrap();
    }
    assert_eq!(body(&sink.take(1).await[0]), "ticked-by-mikkoo");
    // The unroutable one fails, goes to the retry queue, is brought back by the ticker's
    // maintenance, fails again and is dead-lettered (max_failures: 1): two attempts.
    eventually("the retried event to be dead-lettered", || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM mikkoo.dead_letter WHERE queue = $1 AND ev_retry = 1",
                &[&queue],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == 1).then_some(())
    })
    .await;
    assert!(relay.stop().await.success());
    drop(client);
    driver.abort();
    admin
        .execute(&format!("DROP DATABASE {database} WITH (FORCE)"), &[])
        .await
        .unwrap();
}

/// A relay with a statsd destination on a free `port` where nothing listens yet, that
/// has relayed two events and said it cannot reach statsd. Returns the relay, its queue
/// (kept while the relay runs) and the line the first flush that gets through must
/// carry: both events in one count.
async fn relay_with_statsd_down(prefix: &str, protocol: &str, port: u16) -> (Relay, PgQueue, String) {
    let mut queue = PgQueue::create(prefix).await;
    let mut sink = Sink::topic(prefix).await;
    let config = format!(
        "{}  statsd: {{enabled: true, host: 127.0.0.1, port: {port}, prefix: relay, protocol: {protocol}}}\n",
        config_yaml(&[worker_yaml(&queue.name, "")])
    );
    let relay = Relay::start(&config);
    queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "k", "one"),
            NewEvent::to(&sink.exchange, "k", "two"),
        ])
        .await;
    sink.take(2).await;
    relay
        .wait_for_log("figures are kept and sent once it answers")
        .await;
    // A few more failed attempts (debug lines, with the next delay): the outage is
    // still warned about only once.
    eventually("two more failed attempts to reach statsd", || async {
        let retries = relay
            .log()
            .lines()
            .filter(|line| line.contains(" DEBUG ") && line.contains("statsd") && line.contains("retry_in="))
            .count();
        (retries >= 2).then_some(())
    })
    .await;
    let warnings = relay
        .log()
        .matches("figures are kept and sent once it answers")
        .count();
    assert_eq!(warnings, 1, "one warning per outage:\n{}", relay.log());
    let expected = format!("relay.{}.counters.processed:2|c", queue.name);
    (relay, queue, expected)
}

#[tokio::test]
async fn statsd_over_tcp_catches_up_once_its_server_listens() {
    let port = free_port();
    let (mut relay, _queue, expected) = relay_with_statsd_down("ops_statsd_late_tcp", "tcp", port).await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (stream, _) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .expect("the relay connects again within the backoff's 30 s")
        .unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    let found = tokio::time::timeout(DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(".counters.processed:") {
                return line;
            }
        }
        String::new()
    })
    .await
    .unwrap();
    assert_eq!(found, expected, "the counts made while statsd was down arrive");
    relay.wait_for_log("statsd server reachable again").await;
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn statsd_over_udp_catches_up_once_its_server_listens() {
    let port = {
        let reserved = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        reserved.local_addr().unwrap().port()
    };
    let (mut relay, _queue, expected) = relay_with_statsd_down("ops_statsd_late_udp", "udp", port).await;
    let socket = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await.unwrap();
    let found = tokio::time::timeout(DEADLINE, async {
        let mut buffer = vec![0u8; 65536];
        loop {
            let n = socket.recv(&mut buffer).await.unwrap();
            // Empty datagrams are the relay's probes; statsd servers skip them.
            let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
            if let Some(line) = text.lines().find(|l| l.contains(".counters.processed:")) {
                return line.to_owned();
            }
        }
    })
    .await
    .expect("the relay sends again within the backoff's 30 s");
    assert_eq!(found, expected, "the counts made while statsd was down arrive");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn the_built_in_ticker_backs_off_while_its_database_is_down() {
    // A database of its own (the ticker takes one lock per database), with one queue
    // `ticked` that `mikkoo` consumes.
    let db = Database::create("ticker_down_db").await;
    db.client
        .batch_execute("SELECT pgq.create_queue('ticked'); SELECT pgq.register_consumer('ticked', 'mikkoo');")
        .await
        .unwrap();
    let database = &db.name;
    // PostgreSQL behind a proxy that refuses connections until started.
    let mut proxy = faults::Proxy::reserved("127.0.0.1:5432").await;
    let url = format!("postgresql://postgres@127.0.0.1:{}/{database}", proxy.port);
    let worker = worker_yaml("ticked", "").replace(PG_URL, &url);
    let config = format!(
        "{}  ticker: {{enabled: true, period: 200ms}}\n",
        config_yaml(&[worker])
    );
    let mut relay = Relay::start(&config);
    relay
        .wait_for_log("pgq ticker failed; reconnecting with backoff")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = relay.log();
    assert_eq!(
        log.matches("pgq ticker failed").count(),
        1,
        "one error per outage:\n{log}"
    );
    // Every `period` (200 ms) would be 15 attempts in 3 s; backing off from 100 ms
    // (jittered to half at least) makes at most 7.
    let attempts = log.matches("pgq ticker still failing; retrying").count();
    assert!(attempts <= 7, "{attempts} attempts in 3 s: no backoff\n{log}");

    proxy.start().await;
    relay.wait_for_log("pgq ticker reconnected").await;
    relay.wait_for_log("ticking pgq").await;
    assert!(relay.stop().await.success());
}

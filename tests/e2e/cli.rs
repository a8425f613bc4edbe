//! The command line: help, version, `sql`, `check`, configuration errors and exit codes.

use crate::support::*;

#[test]
fn help_starts_with_the_tagline() {
    for flag in ["-h", "--help"] {
        let (status, stdout, _) = run_cli(&[flag]);
        assert!(status.success());
        assert_eq!(stdout.lines().next(), Some("Mikkoo is a PgQ to RabbitMQ Relay"));
    }
}

#[test]
fn version_is_printed() {
    for flag in ["-V", "--version"] {
        let (status, stdout, _) = run_cli(&[flag]);
        assert!(status.success());
        assert_eq!(stdout.trim(), format!("mikkoo {}", env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn usage_errors_exit_2() {
    let (status, _, stderr) = run_cli(&["--no-such-flag"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn sql_prints_the_helper_schema() {
    let (status, stdout, _) = run_cli(&["sql"]);
    assert!(status.success());
    assert_eq!(stdout, mikkoo::schema::MIKKOO_SQL);
    assert!(stdout.contains("CREATE TABLE IF NOT EXISTS mikkoo.dead_letter"));
}

#[test]
fn configuration_errors_exit_2_with_file_and_key_path() {
    let (_dir, path) = write_config(
        "Application:\n  workers:\n    invoices:\n      postgres_url: postgresql://localhost/db\n      rabbitmq: {port: 70000}\n",
    );
    for args in [vec!["check", "-c"], vec!["-f", "-c"]] {
        let mut args: Vec<&str> = args;
        let path_text = path.to_str().unwrap();
        args.push(path_text);
        let (status, _, stderr) = run_cli(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "configuration error in {path_text}: Application.workers.invoices.rabbitmq.port: must be between 1 and 65535"
            )),
            "{stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
    }
}

#[test]
fn unreadable_and_malformed_files_exit_2() {
    let (status, _, stderr) = run_cli(&["check", "-c", "/nonexistent/mikkoo.yaml"]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("/nonexistent/mikkoo.yaml") && stderr.contains("cannot read the file"),
        "{stderr}"
    );
    let (_dir, path) = write_config("Application: [unclosed\n");
    let (status, _, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("invalid YAML"), "{stderr}");
}

#[test]
fn the_python_relays_configuration_files_pass_check() {
    for fixture in ["python-example.yaml", "python-docs-example.yaml"] {
        let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let (status, stdout, stderr) = run_cli(&["check", "-c", &path]);
        assert!(status.success(), "{fixture}: {stderr}");
        assert!(stdout.contains("configuration is valid"), "{stdout}");
    }
}

#[test]
fn check_warns_about_unknown_keys_and_hides_passwords() {
    let (_dir, path) = write_config(
        "Application:\n  workers:\n    q:\n      postgres_url: postgresql://u:pg-secret@localhost/db\n      \
         rabbitmq_url: amqp://u:amqp-secret@localhost/%2f\n      max_failurs: 3\n",
    );
    let (status, stdout, stderr) = run_cli(&["check", "-c", path.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("unknown configuration key Application.workers.q.max_failurs"),
        "{stderr}"
    );
    let everything = format!("{stdout}{stderr}");
    assert!(
        !everything.contains("pg-secret") && !everything.contains("amqp-secret"),
        "{everything}"
    );
    assert!(stdout.contains("postgresql://u:***@localhost/db"), "{stdout}");
}

#[test]
fn check_connect_reaches_both_servers() {
    let (_dir, path) = write_config(&config_yaml(&[worker_yaml(&unique("check"), "")]));
    let (status, stdout, stderr) = run_cli(&["check", "--connect", "-c", path.to_str().unwrap()]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("PostgreSQL at 127.0.0.1:5432 ok"), "{stdout}");
    assert!(stdout.contains("RabbitMQ at 127.0.0.1:5672 ok"), "{stdout}");
}

#[test]
fn check_connect_names_the_unreachable_server() {
    // Port 1 on loopback: nothing listens there, so both connections are refused.
    let worker = "    q:\n      postgres_url: postgresql://postgres@127.0.0.1:1/postgres\n      \
                  rabbitmq: {host: 127.0.0.1, port: 1}\n";
    let (_dir, path) = write_config(&config_yaml(&[worker.to_owned()]));
    let (status, stdout, stderr) = run_cli(&["check", "--connect", "-c", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("PostgreSQL at 127.0.0.1:1 FAILED"), "{stdout}");
    assert!(stdout.contains("RabbitMQ at 127.0.0.1:1 FAILED"), "{stdout}");
}

#[tokio::test]
async fn check_connect_explains_a_missing_pgq_extension() {
    let client = pg().await;
    let database = unique("nopgq");
    client
        .execute(&format!("CREATE DATABASE {database}"), &[])
        .await
        .unwrap();
    let worker = format!(
        "    q:\n      postgres_url: postgresql://postgres@127.0.0.1:5432/{database}\n      rabbitmq_url: {AMQP_URL}\n"
    );
    let (_dir, path) = write_config(&config_yaml(&[worker]));
    let output =
        tokio::task::spawn_blocking(move || run_cli(&["check", "--connect", "-c", path.to_str().unwrap()]))
            .await
            .unwrap();
    client
        .execute(&format!("DROP DATABASE {database}"), &[])
        .await
        .unwrap();
    let (status, stdout, _) = output;
    assert_eq!(status.code(), Some(1));
    assert!(
        stdout.contains(&format!(
            "pgq extension is not installed in database {database}: CREATE EXTENSION pgq"
        )),
        "{stdout}"
    );
}

/// Every line of `stderr` as JSON; fails the test on a line that is not an object.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{stderr}"));
            assert!(value.is_object(), "{line}");
            value
        })
        .collect()
}

/// The JSON lines whose message contains `needle`.
fn messages_with<'a>(lines: &'a [serde_json::Value], needle: &str) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|line| line["message"].as_str().is_some_and(|m| m.contains(needle)))
        .collect()
}

/// A configuration without workers: `application` lines go under `Application`,
/// `rest` after it.
fn idle_config(application: &str, rest: &str) -> String {
    format!("Application:\n  workers: {{}}\n{application}{rest}")
}

/// A TCP port held by the test for as long as the listener lives.
fn taken_port() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

#[test]
fn logging_setup_errors_name_the_configuration_file() {
    let logging = "Logging:\n  version: 1\n  handlers:\n    file:\n      class: logging.FileHandler\n      \
                   filename: /nonexistent/dir/mikkoo.log\n  root:\n    level: INFO\n    handlers: [file]\n";
    let (_dir, path) = write_config(&idle_config("", logging));
    let path_text = path.to_str().unwrap();
    let (status, _, stderr) = run_cli(&["-f", "-c", path_text]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "configuration error in {path_text}: Logging.handlers.file: cannot open /nonexistent/dir/mikkoo.log"
        )),
        "{stderr}"
    );
}

#[test]
fn a_malformed_sentry_dsn_is_a_configuration_error() {
    let (_dir, path) = write_config(&idle_config("  sentry_dsn: not-a-dsn\n", ""));
    let path_text = path.to_str().unwrap();
    for args in [vec!["-f", "-c", path_text], vec!["check", "-c", path_text]] {
        let (status, _, stderr) = run_cli(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "configuration error in {path_text}: Application.sentry_dsn: not a valid Sentry DSN"
            )),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn daemon_mode_reports_an_http_address_in_use_before_detaching() {
    let (_held, port) = taken_port();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("mikkoo.pid");
    let daemon = format!("Daemon:\n  pidfile: {}\n", pidfile.display());
    let (_config_dir, path) = write_config(&idle_config(&http_yaml(port), &daemon));
    let (status, _, stderr) = run_cli(&["-c", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (Application.http.listen)"
        )),
        "{stderr}"
    );
    assert!(!pidfile.exists(), "no daemon was started");
}

#[test]
fn json_log_format_writes_only_json_lines_on_errors() {
    // A configuration error.
    let (_dir, bad) = write_config("Application:\n  workers: {}\n  poll_interval: soon\n");
    let (status, _, stderr) = run_cli(&["-f", "--log-format", "json", "-c", bad.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let lines = json_lines(&stderr);
    assert_eq!(
        messages_with(&lines, "Application.poll_interval").len(),
        1,
        "{stderr}"
    );

    // Daemon mode: the warning about discarded log lines, then a pidfile naming a live
    // process (this test's).
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("mikkoo.pid");
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let daemon = format!("Daemon:\n  pidfile: {}\n", pidfile.display());
    let (_config_dir, path) = write_config(&idle_config("", &daemon));
    let (status, _, stderr) = run_cli(&["--log-format", "json", "-c", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = json_lines(&stderr);
    let warnings = messages_with(&lines, "no file or syslog handler");
    assert!(warnings.len() == 1 && warnings[0]["level"] == "WARN", "{stderr}");
    let errors = messages_with(&lines, "names running process");
    assert!(errors.len() == 1 && errors[0]["level"] == "ERROR", "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", std::process::id()),
        "a live process's pidfile is left alone"
    );

    // In the foreground the log is on stderr already: the fatal error is written once.
    let (_held, port) = taken_port();
    let (_config_dir, path) = write_config(&idle_config(&http_yaml(port), ""));
    let (status, _, stderr) = run_cli(&["-f", "--log-format", "json", "-c", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = json_lines(&stderr);
    assert_eq!(
        messages_with(&lines, &format!("127.0.0.1:{port}")).len(),
        1,
        "{stderr}"
    );
}

/// Runs `mikkoo -f` with `config` (serving HTTP on `port`) and `args` until `/livez`
/// answers, stops it, and returns what it wrote to stderr.
async fn stderr_of_a_short_run(config: &str, port: u16, args: &[&str]) -> String {
    let (dir, path) = write_config(config);
    let log_path = dir.path().join("stderr.log");
    let mut child = mikkoo_command(&["-f", "-c", path.to_str().unwrap()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    wait_http(port, "/livez", 200).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{log}");
    log
}

#[tokio::test]
async fn log_level_overrides_the_logging_section() {
    let port = free_port();
    let debug_everything = "Logging:\n  version: 1\n  root:\n    level: DEBUG\n";
    let config = idle_config(&http_yaml(port), debug_everything);
    let quiet = stderr_of_a_short_run(&config, port, &["--log-level", "error"]).await;
    assert!(
        !quiet.contains("mikkoo starting") && !quiet.contains(" INFO ") && !quiet.contains(" DEBUG "),
        "{quiet}"
    );
    let info = stderr_of_a_short_run(&config, port, &["--log-level", "info"]).await;
    assert!(info.contains("mikkoo starting"), "{info}");
    assert!(!info.contains(" DEBUG "), "{info}");
}

/// Stops a daemon (SIGTERM) when the test ends, even a failed one.
/// The pid a daemon writes to `pidfile` after forking, waited for up to [`DEADLINE`].
fn wait_for_pid(pidfile: &std::path::Path) -> u32 {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|text| text.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pid in {}",
            pidfile.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn daemon_syslog_lines_carry_the_daemons_pid() {
    let syslog = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    syslog.set_read_timeout(Some(DEADLINE)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("mikkoo.pid");
    let rest = format!(
        "Daemon:\n  pidfile: {}\nLogging:\n  version: 1\n  handlers:\n    syslog:\n      \
         class: logging.handlers.SysLogHandler\n      address: [127.0.0.1, {}]\n  \
         root:\n    level: INFO\n    handlers: [syslog]\n",
        pidfile.display(),
        syslog.local_addr().unwrap().port()
    );
    let (_config_dir, path) = write_config(&idle_config("", &rest));
    let launcher = mikkoo_command(&["-c", path.to_str().unwrap()]).spawn().unwrap();
    let launcher_pid = launcher.id();
    let output = launcher.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let daemon = wait_for_pid(&pidfile);
    let _stop = DaemonGuard(nix::unistd::Pid::from_raw(daemon as i32));

    let mut buffer = [0u8; 4096];
    let starting = loop {
        let n = syslog.recv(&mut buffer).expect("a syslog line from the daemon");
        let datagram = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if datagram.contains("mikkoo starting") {
            break datagram;
        }
    };
    let tagged: u32 = starting
        .split_once("mikkoo[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(pid, _)| pid.parse().ok())
        .unwrap_or_else(|| panic!("no mikkoo[pid] tag: {starting}"));
    assert_eq!(tagged, daemon, "{starting}");
    assert_ne!(tagged, launcher_pid, "{starting}");
}

#[tokio::test]
async fn subcommands_log_warnings_to_stderr_as_json() {
    use lapin::options::{
        BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let amqp_queue = unique("cli_audit");
    channel
        .queue_declare(
            amqp_queue.as_str().into(),
            QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    // No message_id: audit consume has no row to mark and warns about it.
    let confirm = channel
        .basic_publish(
            "".into(),
            amqp_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"unaudited",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(confirm.await.unwrap().is_ack());

    let (_dir, path) = write_config(&config_yaml(&[worker_yaml(&unique("cli_audit"), "")]));
    let args = [
        "audit",
        "consume",
        "--log-format",
        "json",
        "-c",
        path.to_str().unwrap(),
        "--amqp-queue",
        &amqp_queue,
        "--max-messages",
        "1",
        "--idle-exit",
        "20s",
    ]
    .map(str::to_owned);
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args)
    })
    .await
    .unwrap();
    let _ = channel
        .queue_delete(amqp_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("consumed 1 message(s)"), "{stdout}");
    let lines = json_lines(&stderr);
    let warnings = messages_with(&lines, "message has no audit row waiting for it");
    assert!(warnings.len() == 1 && warnings[0]["level"] == "WARN", "{stderr}");
}

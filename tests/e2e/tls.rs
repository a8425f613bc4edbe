//! TLS to RabbitMQ and PostgreSQL, verified by default, and secrets that never show
//! (SPEC §3.3–3.4). `scripts/services.sh` made the throw-away CA and certificates in
//! `/var/lib/mikkoo-test-tls`: RabbitMQ listens with TLS on 127.0.0.1:5671 (client
//! certificates verified when presented), stunnel on 127.0.0.1:5673 requires client
//! certificates and forwards to RabbitMQ, and PostgreSQL serves the test CA's
//! certificate; both server certificates name only `localhost`.

use std::process::Command;

use crate::support::*;

const TLS: &str = "/var/lib/mikkoo-test-tls";
const KEY_PASSWORD: &str = "k3y-pass-9f2c";

/// RabbitMQ's own TLS listener: it verifies client certificates when presented.
const TLS_PORT: u16 = 5671;
/// The listener that requires client certificates signed by the test CA (stunnel in
/// front of RabbitMQ: RabbitMQ applies one set of TLS options to all its listeners).
const CLIENT_CERT_REQUIRED_PORT: u16 = 5673;

/// A worker that reaches RabbitMQ over TLS with `ssl_options` (YAML flow mapping body)
/// at `host`.
fn tls_worker(queue: &str, host: &str, ssl_options: &str) -> String {
    tls_worker_at(queue, host, TLS_PORT, ssl_options)
}

fn tls_worker_at(queue: &str, host: &str, port: u16, ssl_options: &str) -> String {
    worker_yaml_via(
        queue,
        "",
        &format!("host: {host}, port: {port}, ssl_options: {{{ssl_options}}}"),
    )
}

/// `ssl_options` with the test CA and the client certificate with its encrypted key.
fn client_certificate_options() -> String {
    format!(
        "ca_certs: {TLS}/ca.pem, certfile: {TLS}/client.pem, keyfile: {TLS}/client-encrypted.key, password: {KEY_PASSWORD}"
    )
}

fn check_connect(config: &str) -> (std::process::ExitStatus, String) {
    let (_dir, path) = write_config(config);
    let (status, stdout, stderr) = run_cli(&["check", "--connect", "-c", path.to_str().unwrap()]);
    (status, format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn relays_over_tls_with_a_ca_file_a_ca_directory_and_ca_data() {
    let mut queues = Vec::new();
    for prefix in ["tls_file", "tls_dir", "tls_data"] {
        queues.push(PgQueue::create(prefix).await);
    }
    let ca_data = std::fs::read_to_string(format!("{TLS}/ca.pem")).unwrap();
    let ca_data_yaml = serde_json::to_string(&ca_data).unwrap();
    let workers = [
        tls_worker(&queues[0].name, "localhost", &format!("ca_certs: {TLS}/ca.pem")),
        tls_worker(&queues[1].name, "localhost", &format!("ca_path: {TLS}/ca-dir")),
        tls_worker(&queues[2].name, "localhost", &format!("ca_data: {ca_data_yaml}")),
    ];
    let mut sink = Sink::topic("tls").await;
    let mut relay = Relay::start(&config_yaml(&workers));
    for (index, queue) in queues.iter_mut().enumerate() {
        queue
            .insert_batch(&[NewEvent::to(&sink.exchange, "k", &format!("over-tls-{index}"))])
            .await;
    }
    let mut bodies: Vec<String> = sink.take(3).await.iter().map(body).collect();
    bodies.sort();
    assert_eq!(bodies, ["over-tls-0", "over-tls-1", "over-tls-2"]);
    assert!(relay.log().contains("connected to rabbitmq") && relay.log().contains("localhost:5671"));
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn mutual_tls_with_an_encrypted_key_presents_the_client_certificate() {
    let mut queue = PgQueue::create("tls_mutual").await;
    let mut sink = Sink::topic("tls_mutual").await;
    let options = client_certificate_options();
    let mut relay = Relay::start(&config_yaml(&[tls_worker(&queue.name, "localhost", &options)]));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "mutual")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "mutual");
    // RabbitMQ saw (and verified against the CA) the client certificate.
    let listing = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "peer_cert_subject",
            "client_properties",
            "--no-table-headers",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let line = listing
        .lines()
        .find(|line| line.contains(&format!("mikkoo {} localhost", queue.name)))
        .unwrap_or_else(|| panic!("no connection of the relay in {listing}"));
    assert!(line.contains("CN=mikkoo test client"), "{line}");
    assert!(relay.stop().await.success());

    let wrong_password = options.replace(&format!("password: {KEY_PASSWORD}"), "password: not-the-password");
    let (status, output) = check_connect(&config_yaml(&[tls_worker(
        &queue.name,
        "localhost",
        &wrong_password,
    )]));
    assert_eq!(status.code(), Some(1));
    assert!(
        output.contains("cannot load keyfile") && output.contains("wrong password?"),
        "{output}"
    );
}

#[tokio::test]
async fn a_listener_that_requires_client_certificates_gets_one_and_refuses_clearly_without() {
    let mut queue = PgQueue::create("tls_required").await;
    let mut sink = Sink::topic("tls_required").await;
    let without_certificate = format!("ca_certs: {TLS}/ca.pem");
    let (status, output) = check_connect(&config_yaml(&[tls_worker_at(
        &queue.name,
        "localhost",
        CLIENT_CERT_REQUIRED_PORT,
        &without_certificate,
    )]));
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(&format!(
            "RabbitMQ at localhost:{CLIENT_CERT_REQUIRED_PORT} FAILED"
        )),
        "{output}"
    );
    // The alert, or (when the broker's close overtakes it) a broken pipe right after
    // the handshake: both point at the fix.
    assert!(
        output.contains("client certificate") && output.contains("set ssl_options.certfile and keyfile"),
        "{output}"
    );

    let mut relay = Relay::start(&config_yaml(&[tls_worker_at(
        &queue.name,
        "localhost",
        CLIENT_CERT_REQUIRED_PORT,
        &client_certificate_options(),
    )]));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "certificate-required")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "certificate-required");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_wrong_ca_is_refused_clearly_and_verify_false_accepts_it() {
    let queue = unique("tls_wrong_ca");
    let (status, output) = check_connect(&config_yaml(&[tls_worker(
        &queue,
        "localhost",
        &format!("ca_certs: {TLS}/other-ca.pem"),
    )]));
    assert_eq!(status.code(), Some(1));
    assert!(output.contains("RabbitMQ at localhost:5671 FAILED"), "{output}");
    assert!(
        output.contains("certificate verify failed") && output.contains("ssl_options.ca_certs"),
        "{output}"
    );

    let unverified = tls_worker(
        &queue,
        "localhost",
        &format!("ca_certs: {TLS}/other-ca.pem, verify: false"),
    );
    let (status, output) = check_connect(&config_yaml(&[unverified]));
    assert!(status.success(), "{output}");
    assert!(
        output.contains("verify is false"),
        "a warning names the key: {output}"
    );
}

#[tokio::test]
async fn a_wrong_host_name_is_refused_and_server_name_or_verify_false_accept_it() {
    let queue = unique("tls_host");
    let ca = format!("ca_certs: {TLS}/ca.pem");
    // The certificate names localhost, not 127.0.0.1.
    let (status, output) = check_connect(&config_yaml(&[tls_worker(&queue, "127.0.0.1", &ca)]));
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("certificate verify failed"), "{output}");
    let (status, output) = check_connect(&config_yaml(&[tls_worker(
        &queue,
        "127.0.0.1",
        &format!("{ca}, server_name: localhost"),
    )]));
    assert!(status.success(), "{output}");
    let (status, output) = check_connect(&config_yaml(&[tls_worker(
        &queue,
        "127.0.0.1",
        &format!("{ca}, verify: false"),
    )]));
    assert!(status.success(), "{output}");
}

#[tokio::test]
async fn amqps_urls_turn_tls_on_and_verify_by_default() {
    let queue = unique("tls_url");
    let url_worker = |extra: &str| {
        worker_yaml_via(
            &queue,
            "",
            &format!("url: \"amqps://guest:guest@localhost:5671/%2f\"{extra}"),
        )
    };
    let (status, output) = check_connect(&config_yaml(&[url_worker(&format!(
        ", ssl_options: {{ca_certs: {TLS}/ca.pem}}"
    ))]));
    assert!(status.success(), "{output}");
    assert!(output.contains("amqps://guest:***@localhost:5671"), "{output}");
    // Without our CA, the system trust store does not know the test CA: refused.
    let (status, output) = check_connect(&config_yaml(&[url_worker("")]));
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("certificate verify failed"), "{output}");
}

/// Connects with the library as the relay does and asks PostgreSQL whether TLS is on.
async fn pg_ssl(url: &str) -> Result<bool, String> {
    let target = mikkoo::pgconn::PgTarget::parse(url)?;
    let (client, _driver) = target
        .connect("mikkoo tls test")
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn every_postgres_sslmode_behaves_as_libpq() {
    let root = format!("sslrootcert={TLS}/ca.pem");
    let other = format!("sslrootcert={TLS}/other-ca.pem");
    let url = |host: &str, query: &str| format!("postgresql://postgres@{host}:5432/postgres?{query}");
    assert_eq!(pg_ssl(&url("localhost", "sslmode=disable")).await, Ok(false));
    assert_eq!(pg_ssl(&url("localhost", "sslmode=allow")).await, Ok(true));
    assert_eq!(pg_ssl(&url("localhost", "sslmode=prefer")).await, Ok(true));
    assert_eq!(
        pg_ssl(&url("localhost", "")).await,
        Ok(true),
        "prefer is the default"
    );
    assert_eq!(
        pg_ssl(&url("127.0.0.1", "sslmode=require")).await,
        Ok(true),
        "require does not verify"
    );
    assert_eq!(
        pg_ssl(&url("localhost", &format!("sslmode=require&{root}"))).await,
        Ok(true)
    );
    let error = pg_ssl(&url("localhost", &format!("sslmode=require&{other}")))
        .await
        .unwrap_err();
    assert!(
        error.contains("certificate verify failed"),
        "require with sslrootcert verifies, as libpq: {error}"
    );
    assert_eq!(
        pg_ssl(&url("127.0.0.1", &format!("sslmode=verify-ca&{root}"))).await,
        Ok(true),
        "verify-ca ignores the host name"
    );
    let error = pg_ssl(&url("localhost", &format!("sslmode=verify-ca&{other}")))
        .await
        .unwrap_err();
    assert!(error.contains("certificate verify failed"), "{error}");
    assert_eq!(
        pg_ssl(&url("localhost", &format!("sslmode=verify-full&{root}"))).await,
        Ok(true)
    );
    let error = pg_ssl(&url("127.0.0.1", &format!("sslmode=verify-full&{root}")))
        .await
        .unwrap_err();
    assert!(
        error.contains("certificate verify failed"),
        "verify-full checks the host name: {error}"
    );
    let error = pg_ssl(&url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(
        error.contains("cannot load sslrootcert /nonexistent/ca.pem"),
        "{error}"
    );
}

#[tokio::test]
async fn a_relay_worker_uses_verified_tls_to_postgres() {
    let mut queue = PgQueue::create("tls_pg").await;
    let mut sink = Sink::topic("tls_pg").await;
    let worker = worker_yaml(&queue.name, "").replace(
        PG_URL,
        &format!(
            "postgresql://postgres@localhost:5432/postgres?sslmode=verify-full&sslrootcert={TLS}/ca.pem"
        ),
    );
    let mut relay = Relay::start(&config_yaml(&[worker]));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "pg-over-tls")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "pg-over-tls");
    let name = format!("mikkoo {}", queue.name);
    let ssl: bool = queue
        .client
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the relay's session is encrypted");
    assert!(relay.stop().await.success());
}

/// A RabbitMQ user of the test's own, removed when dropped.
struct RabbitUser {
    name: String,
}

impl RabbitUser {
    fn create(password: &str) -> RabbitUser {
        let name = unique("secret_user");
        let run = |args: &[&str]| {
            assert!(
                Command::new("rabbitmqctl")
                    .args(args)
                    .output()
                    .unwrap()
                    .status
                    .success()
            )
        };
        run(&["-q", "add_user", &name, password]);
        run(&["-q", "set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        RabbitUser { name }
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

#[tokio::test]
async fn passwords_never_appear_in_anything_the_relay_prints() {
    let amqp_secret = format!("amqp-{}", unique("secret"));
    let pg_secret = format!("pg-{}", unique("secret"));
    let key_secret = KEY_PASSWORD;
    let user = RabbitUser::create(&amqp_secret);
    let mut queue = PgQueue::create("secrets").await;
    let mut sink = Sink::topic("secrets").await;
    let port = free_port();
    let worker = format!(
        "    {}:\n      postgres_url: postgresql://postgres:{pg_secret}@127.0.0.1:5432/postgres\n      \
         rabbitmq: {{host: localhost, port: 5671, username: {}, password: {amqp_secret}, \
         ssl_options: {{ca_certs: {TLS}/ca.pem, certfile: {TLS}/client.pem, keyfile: {TLS}/client-encrypted.key, \
         password: {key_secret}}}}}\n      wait_duration: 0.05\n",
        queue.name, user.name
    );
    let broken = format!(
        "    {}:\n      postgres_url: postgresql://postgres:{pg_secret}@127.0.0.1:5432/postgres\n      \
         rabbitmq: {{host: 127.0.0.1, username: {}, password: {amqp_secret}-wrong}}\n",
        unique("secrets_broken"),
        user.name
    );
    let config = format!(
        "{}  http: {{listen: \"127.0.0.1:{port}\"}}\n  sentry_dsn: http://sentrysecret@127.0.0.1:1/1\n",
        config_yaml(&[worker, broken])
    );
    let (_dir, path) = write_config(&config);
    let path = path.to_str().unwrap().to_owned();

    // Everything at debug level, dependencies included.
    let log_path = format!("{path}.log");
    let mut child = Command::new(binary())
        .args(["-f", "-c", &path])
        .env("MIKKOO_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "secret-test")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "secret-test");
    let status_json = wait_http(port, "/status", 200).await;
    let readyz = http_get(port, "/readyz")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    eventually("the broken worker to fail authentication", || async {
        std::fs::read_to_string(&log_path)
            .ok()?
            .contains("ACCESS_REFUSED")
            .then_some(())
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();

    let (_, check_out, check_err) = run_cli(&["check", "--connect", "-c", &path]);
    let (_, status_out, status_err) = run_cli(&["status", "-c", &path, "--json"]);
    let everything = [
        log.as_str(),
        &status_json,
        &readyz,
        &check_out,
        &check_err,
        &status_out,
        &status_err,
    ];
    assert!(log.lines().count() > 20, "the debug log has content: {log}");
    for (index, output) in everything.iter().enumerate() {
        for secret in [
            amqp_secret.as_str(),
            pg_secret.as_str(),
            key_secret,
            "sentrysecret",
        ] {
            assert!(
                !output.contains(secret),
                "output {index} contains {secret:?}:\n{output}"
            );
        }
    }
}

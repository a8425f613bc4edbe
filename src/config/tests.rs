//! Configuration loading: defaults, aliases, validation with key paths, old files.

use super::*;
use std::path::Path;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_text(Path::new("test.yaml"), text, &no_env)
}

fn errors(text: &str) -> Vec<String> {
    load(text)
        .expect_err("configuration is invalid")
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

const MINIMAL: &str = "
Application:
  workers:
    invoices:
      postgres_url: postgresql://localhost:5432/postgres
";

/// The Python relay's `example.yaml`, as shipped.
const PYTHON_EXAMPLE: &str = include_str!("../../tests/fixtures/python-example.yaml");
/// The full example of the Python relay's `docs/configuration.md`.
const PYTHON_DOCS_EXAMPLE: &str = include_str!("../../tests/fixtures/python-docs-example.yaml");

#[test]
fn minimal_configuration_gets_every_default() {
    let config = load(MINIMAL).unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let app = &config.application;
    assert_eq!(app.poll_interval, Duration::from_secs(10));
    assert_eq!(app.origin, None);
    assert_eq!(app.statsd, StatsdConfig::default());
    assert_eq!(app.http, None);
    assert_eq!(app.ticker, TickerConfig::default());
    let worker = &app.workers["invoices"];
    assert_eq!(worker.queue, "invoices");
    assert_eq!(worker.consumer_name, "mikkoo");
    assert!(worker.confirm);
    assert!(worker.mandatory);
    assert_eq!(worker.max_in_flight, worker::DEFAULT_MAX_IN_FLIGHT);
    assert_eq!(worker.confirm_timeout, worker::DEFAULT_CONFIRM_TIMEOUT);
    assert_eq!(worker.fetch_size, worker::DEFAULT_FETCH_SIZE);
    assert_eq!(worker.delivery_mode, 2);
    assert_eq!(worker.app_id, format!("mikkoo/{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(worker.message_id, MessageIdMode::Deterministic);
    assert_eq!(worker.max_failures, 10);
    assert_eq!(worker.retry_delay, Duration::from_secs(10));
    assert_eq!(worker.wait_duration, Duration::from_secs(1));
    assert!(worker.batch_window.is_default());
    assert_eq!(worker.dead_letter, DeadLetterTarget::Table);
    assert!(worker.exclusive);
    assert!(!worker.unregister);
    assert_eq!(worker.shutdown_timeout, Duration::from_secs(30));
    assert!(!worker.audit);
    assert_eq!(worker.rabbitmq, RabbitmqConfig::default());
    assert_eq!(worker.rabbitmq.hosts, ["localhost"]);
    assert_eq!(worker.rabbitmq.port, 5672);
    assert_eq!(worker.rabbitmq.heartbeat, Duration::from_secs(300));
    assert_eq!(worker.rabbitmq.frame_max, 131_072);
}

#[test]
fn the_python_relays_example_loads() {
    let config = load(PYTHON_EXAMPLE).unwrap();
    let worker = &config.application.workers["example"];
    assert_eq!(worker.wait_duration, Duration::from_millis(50));
    assert!(!worker.confirm);
    assert_eq!(worker.retry_delay, Duration::from_secs(10));
    assert_eq!(worker.max_failures, 2);
    assert_eq!(worker.rabbitmq.vhost, "/");
    assert_eq!(config.daemon.user.as_deref(), Some("mikkoo"));
    assert_eq!(
        config.daemon.pidfile.as_deref(),
        Some(Path::new("/var/run/mikkoo"))
    );
    assert_eq!(
        config.logging.root_level,
        Some(tracing::level_filters::LevelFilter::ERROR)
    );
    assert_eq!(
        config.logging.loggers["mikkoo"],
        tracing::level_filters::LevelFilter::INFO
    );
    assert_eq!(config.logging.handlers.len(), 1);
    assert!(config.logging.handlers[0].debug_only);
    // `processes` is historical and silently accepted; `confirm: False` is warned about.
    assert!(
        config.warnings.iter().all(|w| !w.contains("processes")),
        "{:?}",
        config.warnings
    );
    assert!(
        config.warnings.iter().any(|w| w.contains("confirm is false")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn the_python_docs_example_loads() {
    let config = load(PYTHON_DOCS_EXAMPLE).unwrap();
    let worker = &config.application.workers["test"];
    assert_eq!(worker.consumer_name, "my_consumer");
    assert_eq!(worker.max_failures, 5);
    assert_eq!(worker.rabbitmq.port, 5671);
    assert!(worker.rabbitmq.tls.as_ref().is_some_and(|tls| tls.verify));
    assert_eq!(worker.retry_delay, Duration::from_secs(5));
    assert!(config.application.statsd.enabled);
    assert!(config.application.sentry_dsn.is_some());
}

#[test]
fn the_python_examples_logging_sections_raise_no_warnings() {
    for text in [
        PYTHON_EXAMPLE,
        PYTHON_DOCS_EXAMPLE,
        include_str!("../../example.yaml"),
    ] {
        let config = load(text).unwrap();
        assert!(
            config.warnings.iter().all(|w| !w.contains("Logging")),
            "{:?}",
            config.warnings
        );
    }
}

#[test]
fn typos_in_logging_are_warned_about_by_name() {
    let text = format!(
        "{MINIMAL}Logging:\n  version: 1\n  formatters: {{verbose: {{format: x}}}}\n  \
         disable_existing_loggers: false\n  loggres: {{}}\n  \
         handlers:\n    console: {{class: logging.StreamHandler, formatter: verbose, levle: INFO}}\n  \
         loggers:\n    mikkoo: {{level: INFO, propagate: true, handlers: [console, consle]}}\n  \
         root: {{level: WARNING, handlers: [console], filtres: []}}\n"
    );
    let config = load(&text).unwrap();
    let warned = |needle: &str| config.warnings.iter().any(|w| w.contains(needle));
    assert!(
        warned("unknown configuration key Logging.loggres"),
        "{:?}",
        config.warnings
    );
    assert!(
        warned("unknown configuration key Logging.handlers.console.levle"),
        "{:?}",
        config.warnings
    );
    assert!(
        warned("unknown configuration key Logging.root.filtres"),
        "{:?}",
        config.warnings
    );
    assert!(
        warned("handler \"consle\" is listed by a logger but not defined"),
        "{:?}",
        config.warnings
    );
    assert_eq!(
        config.warnings.len(),
        4,
        "dictConfig's own keys pass: {:?}",
        config.warnings
    );

    // An unsupported class is one warning, not one per argument of its class; a missing
    // handler listed twice is one warning too.
    let other_class = format!(
        "{MINIMAL}Logging:\n  handlers:\n    mail: {{class: logging.handlers.SMTPHandler, mailhost: m, toaddrs: [a]}}\n  \
         loggers:\n    mikkoo: {{handlers: [mail, gone]}}\n  root: {{handlers: [mail, gone]}}\n"
    );
    let config = load(&other_class).unwrap();
    assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);

    let not_a_mapping = format!("{MINIMAL}Logging:\n  handlers: [console]\n");
    assert!(
        errors(&not_a_mapping)
            .iter()
            .any(|e| e.contains("Logging.handlers: expected a mapping of handler names")),
        "{:?}",
        errors(&not_a_mapping)
    );
}

#[test]
fn lower_case_sections_are_accepted() {
    let text = MINIMAL.replace("Application:", "application:");
    assert!(load(&text).is_ok());
}

#[test]
fn json_files_are_read_as_json() {
    let text = r#"{"Application": {"workers": {"q": {"postgres_url": "postgresql://h/db"}}}}"#;
    let config = Config::from_text(Path::new("mikkoo.json"), text, &no_env).unwrap();
    assert!(config.application.workers.contains_key("q"));
}

#[test]
fn every_key_can_be_set() {
    let text = "
Application:
  poll_interval: 30s
  origin: relay-1.example.com
  statsd: {enabled: yes, host: stats, port: 8126, prefix: relay, include_hostname: true, tcp: true}
  http: {listen: '127.0.0.1:9187'}
  sentry_dsn: https://key@sentry.example.com/1
  ticker: {enabled: true, period: 500ms}
  workers:
    invoices:
      postgresql_url: postgresql://u:pw@db:5433/app
      rabbitmq:
        hosts: [rabbit-1, rabbit-2]
        port: 5673
        vhost: billing
        username: relay
        password: secret
        heartbeat_interval: 60
        frame_max: 65536
        socket_timeout: 2.5
      consumer_name: relay
      confirm: true
      max_in_flight: 64
      confirm_timeout: 5s
      mandatory: false
      delivery_mode: 1
      app_id: billing-relay
      message_id: none
      max_failures: 3
      retry_interval: 1m
      wait_duration: 0.25
      min_count: 100
      min_interval: 2s
      min_lag: 1s
      fetch_size: 250
      dead_letter: {exchange: dlx, routing_key: dead}
      exclusive: false
      unregister: false
      shutdown_timeout: 5
      audit: true
Daemon: {pidfile: /run/mikkoo.pid, user: mikkoo, group: mikkoo}
";
    let config = load(text).unwrap();
    let app = &config.application;
    assert_eq!(app.poll_interval, Duration::from_secs(30));
    assert_eq!(app.origin.as_deref(), Some("relay-1.example.com"));
    assert_eq!(app.statsd.protocol, StatsdProtocol::Tcp);
    assert!(app.statsd.include_hostname && app.statsd.enabled);
    assert_eq!(app.http.as_ref().unwrap().listen.port(), 9187);
    assert_eq!(app.ticker.period, Duration::from_millis(500));
    let worker = &app.workers["invoices"];
    assert_eq!(worker.postgres.host_port(), "db:5433");
    assert_eq!(worker.rabbitmq.hosts, ["rabbit-1", "rabbit-2"]);
    assert_eq!(worker.rabbitmq.port, 5673);
    assert_eq!(worker.rabbitmq.vhost, "billing");
    assert_eq!(worker.rabbitmq.password.expose(), "secret");
    assert_eq!(worker.rabbitmq.heartbeat, Duration::from_secs(60));
    assert_eq!(worker.rabbitmq.frame_max, 65536);
    assert_eq!(worker.rabbitmq.connect_timeout, Duration::from_millis(2500));
    assert_eq!(worker.max_in_flight, 64);
    assert_eq!(worker.confirm_timeout, Duration::from_secs(5));
    assert!(!worker.mandatory);
    assert_eq!(worker.delivery_mode, 1);
    assert_eq!(worker.app_id, "billing-relay");
    assert_eq!(worker.message_id, MessageIdMode::None);
    assert_eq!(worker.retry_delay, Duration::from_secs(60));
    assert_eq!(worker.wait_duration, Duration::from_millis(250));
    assert_eq!(worker.batch_window.min_count, Some(100));
    assert_eq!(worker.batch_window.min_interval, Some(Duration::from_secs(2)));
    assert_eq!(worker.batch_window.min_lag, Some(Duration::from_secs(1)));
    assert_eq!(worker.fetch_size, 250);
    assert_eq!(
        worker.dead_letter,
        DeadLetterTarget::Exchange {
            exchange: "dlx".into(),
            routing_key: Some("dead".into())
        }
    );
    assert!(!worker.exclusive && worker.audit);
    assert_eq!(worker.shutdown_timeout, Duration::from_secs(5));
    assert_eq!(config.daemon.group.as_deref(), Some("mikkoo"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn errors_name_the_key_path() {
    let text = "
Application:
  workers:
    invoices:
      postgres_url: postgresql://localhost/postgres
      rabbitmq: {port: 99999}
      max_failures: lots
      delivery_mode: 3
      wait_duration: forever
      dead_letter: somewhere
";
    let errors = errors(text);
    let expected = [
        "Application.workers.invoices.rabbitmq.port: must be between 1 and 65535, found 99999",
        "Application.workers.invoices.max_failures: expected an integer, found a string",
        "Application.workers.invoices.delivery_mode: must be between 1 and 2, found 3",
        "Application.workers.invoices.wait_duration: expected a duration",
        "Application.workers.invoices.dead_letter: expected table, discard or",
    ];
    for want in expected {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
}

#[test]
fn the_file_is_named_in_the_report() {
    let report = load("Application: {workers: {q: {}}}").unwrap_err().to_string();
    assert_eq!(
        report,
        "configuration error in test.yaml: Application.workers.q.postgres_url: missing: the PostgreSQL URL of the database holding the queue"
    );
}

#[test]
fn missing_sections_and_bad_files_are_errors() {
    assert!(errors("Daemon: {}")[0].starts_with("Application: missing"));
    assert!(errors("")[0].contains("the file is empty"));
    assert!(errors("- a list")[0].contains("must be a mapping"));
    assert!(errors("Application: [unclosed")[0].starts_with("invalid YAML"));
    assert!(
        errors("Application: {workers: [a, b]}")[0].starts_with("Application.workers: expected a mapping")
    );
}

#[test]
fn unknown_keys_are_warnings_naming_them() {
    let text = format!("{MINIMAL}      confrim: true\n  pol_interval: 5\nExtra: 1\n");
    let config = load(&text).unwrap();
    for key in [
        "Application.workers.invoices.confrim",
        "Application.pol_interval",
        "Extra",
    ] {
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w == &format!("unknown configuration key {key} (ignored)")),
            "no warning for {key}: {:?}",
            config.warnings
        );
    }
}

#[test]
fn rabbitmq_mapping_wins_over_url_with_a_warning() {
    let text =
        format!("{MINIMAL}      rabbitmq_url: amqp://other:5672/%2f\n      rabbitmq: {{host: chosen}}\n");
    let config = load(&text).unwrap();
    assert_eq!(config.application.workers["invoices"].rabbitmq.hosts, ["chosen"]);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("ignoring `Application.workers.invoices.rabbitmq_url`")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn tls_options_turn_on_tls_and_port_5671() {
    let text = format!(
        "{MINIMAL}      rabbitmq: {{ssl_options: {{ca_certs: /ca.pem, verify: false, protocol: 2}}}}\n"
    );
    let config = load(&text).unwrap();
    let rabbitmq = &config.application.workers["invoices"].rabbitmq;
    assert_eq!(rabbitmq.port, 5671);
    let tls = rabbitmq.tls.as_ref().unwrap();
    assert!(!tls.verify);
    assert_eq!(tls.ca_certs.as_deref(), Some(Path::new("/ca.pem")));
}

/// The RabbitMQ port a `rabbitmq:` mapping (YAML flow text) resolves to.
fn port_of(rabbitmq: &str) -> u16 {
    let config = load(&format!("{MINIMAL}      rabbitmq: {rabbitmq}\n")).unwrap();
    config.application.workers["invoices"].rabbitmq.port
}

#[test]
fn ssl_options_keep_an_explicit_port() {
    let tls = "ssl_options: {ca_certs: /ca.pem}";
    assert_eq!(
        port_of(&format!("{{url: 'amqp://h:5672', {tls}}}")),
        5672,
        "the URL's port"
    );
    assert_eq!(port_of(&format!("{{port: 5673, {tls}}}")), 5673, "the port key");
    assert_eq!(
        port_of(&format!("{{url: 'amqp://h:5672', port: 5674, {tls}}}")),
        5674,
        "the port key over the URL's"
    );
}

#[test]
fn ssl_options_default_the_port_to_5671_only_when_none_is_given() {
    let tls = "ssl_options: {ca_certs: /ca.pem}";
    assert_eq!(port_of(&format!("{{url: 'amqp://h', {tls}}}")), 5671);
    assert_eq!(port_of(&format!("{{host: h, {tls}}}")), 5671);
    assert_eq!(port_of("{url: 'amqps://h'}"), 5671);
    assert_eq!(port_of("{url: 'amqp://h'}"), 5672);
}

#[test]
fn environment_variables_are_expanded_and_missing_ones_named() {
    let env = |name: &str| (name == "RABBIT_PASSWORD").then(|| "from-env".to_owned());
    let text = format!(
        "{MINIMAL}      rabbitmq: {{password: '${{RABBIT_PASSWORD}}', port: '${{RABBIT_PORT:-5673}}'}}\n"
    );
    let config = Config::from_text(Path::new("t.yaml"), &text, &env).unwrap();
    let rabbitmq = &config.application.workers["invoices"].rabbitmq;
    assert_eq!(rabbitmq.password.expose(), "from-env");
    assert_eq!(rabbitmq.port, 5673);
    let text = format!("{MINIMAL}      rabbitmq: {{password: '${{NOT_SET}}'}}\n");
    let errors = errors(&text);
    assert!(
        errors[0].starts_with(
            "Application.workers.invoices.rabbitmq.password: environment variable NOT_SET is not set"
        ),
        "{errors:?}"
    );
}

#[test]
fn password_file_loses_its_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "s3cret\n").unwrap();
    let text = format!("{MINIMAL}      rabbitmq: {{password_file: {}}}\n", file.display());
    let config = load(&text).unwrap();
    assert_eq!(
        config.application.workers["invoices"].rabbitmq.password.expose(),
        "s3cret"
    );
    let text = format!("{MINIMAL}      rabbitmq: {{password_file: /nonexistent/pw}}\n");
    assert!(errors(&text)[0].starts_with("Application.workers.invoices.rabbitmq.password_file: cannot read"));
}

#[test]
fn secrets_never_appear_in_debug_output_or_errors() {
    let text = format!(
        "{}      rabbitmq: {{password: hunter2-rabbit}}\n  sentry_dsn: https://hunter2-sentry@x/1\n",
        MINIMAL.replace("localhost:5432", "u:hunter2-pg@localhost:5432")
    );
    let config = load(&text).unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    let text = MINIMAL.replace(
        "localhost:5432/postgres",
        "u:hunter2@localhost:5432/postgres?sslmode=bogus",
    );
    let report = load(&text).unwrap_err().to_string();
    assert!(
        !report.contains("hunter2") && report.contains("sslmode"),
        "{report}"
    );
}

#[test]
fn risky_settings_are_warned_about_by_key() {
    let text = format!("{MINIMAL}      unregister: true\n      confirm: false\n");
    let config = load(&text).unwrap();
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.starts_with("Application.workers.invoices.unregister is true"))
    );
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.starts_with("Application.workers.invoices.confirm is false"))
    );
}

#[test]
fn the_shipped_example_yaml_loads_without_warnings() {
    let text = include_str!("../../example.yaml");
    let config = Config::from_text(Path::new("example.yaml"), text, &|name| match name {
        "RABBITMQ_PASSWORD" => Some("guest".into()),
        _ => None,
    })
    .unwrap_or_else(|errors| panic!("{errors}"));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn http_without_listen_serves_on_the_default_address() {
    let config = load(&format!("{MINIMAL}  http: {{}}\n")).unwrap();
    assert_eq!(
        config.application.http.unwrap().listen.to_string(),
        DEFAULT_HTTP_LISTEN
    );
    let config = load(&format!("{MINIMAL}  http: true\n")).unwrap();
    assert!(config.application.http.is_some());
    let config = load(&format!("{MINIMAL}  http: false\n")).unwrap();
    assert!(config.application.http.is_none());
}

#[test]
fn heartbeat_takes_durations_in_whole_seconds() {
    let config = load(&format!("{MINIMAL}      rabbitmq: {{heartbeat_interval: 1m}}\n")).unwrap();
    assert_eq!(
        config.application.workers["invoices"].rabbitmq.heartbeat,
        Duration::from_secs(60)
    );
    let errors = errors(&format!(
        "{MINIMAL}      rabbitmq: {{heartbeat_interval: 1000000}}\n"
    ));
    assert!(errors[0].contains("at most 65535 seconds"), "{errors:?}");
}

#[test]
fn absurd_durations_are_errors() {
    let errors = errors(&format!(
        "{MINIMAL}      retry_delay: 100000000000\n      wait_duration: 10000h\n"
    ));
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("Application.workers.invoices.retry_delay: must be at most a year"))
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("Application.workers.invoices.wait_duration: must be at most a year"))
    );
}

#[test]
fn one_bad_value_does_not_hide_the_others() {
    let text = format!(
        "{MINIMAL}      dead_letter: nowhere\n      max_failures: many\n  statsd: {{protocol: carrier-pigeon, port: 0}}\n"
    );
    let errors = errors(&text);
    for want in [
        "dead_letter: expected table",
        "max_failures: expected an integer",
        "statsd.protocol: expected udp or tcp",
        "statsd.port: must be between",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "missing {want:?} in {errors:#?}"
        );
    }
}

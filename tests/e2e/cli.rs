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

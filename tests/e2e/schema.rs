//! The helper schema, auditing end to end, and dead-letter tooling (SPEC §1, §9).

use lapin::types::AMQPValue;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::support::*;

async fn install(client: &Client) {
    client.batch_execute(mikkoo::schema::MIKKOO_SQL).await.unwrap();
}

/// Makes sure the main test database has the helper schema (concurrent installs are
/// serialised by the schema's own advisory lock).
async fn install_in_main_database() {
    install(&pg().await).await;
}

#[tokio::test]
async fn the_schema_installs_twice_and_over_the_python_relays() {
    let db = Database::create("schema_upgrade").await;
    db.client
        .batch_execute(include_str!("../fixtures/python-schema.sql"))
        .await
        .unwrap();
    install(&db.client).await;
    install(&db.client).await;
    let columns: Vec<String> = db
        .client
        .query(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'mikkoo' AND table_name = 'audit'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for column in ["confirmed_at", "received_at", "published_at", "message_id"] {
        assert!(
            columns.iter().any(|c| c == column),
            "{column} missing from {columns:?}"
        );
    }
    let kept: String = db
        .client
        .query_one("SELECT payload FROM mikkoo.audit WHERE event_id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, "kept across the upgrade");
    let strict: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'mikkoo' AND p.proisstrict",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        strict, 0,
        "no function is STRICT any more (NULL arguments are not silent no-ops)"
    );
    let dead_letter: bool = db
        .client
        .query_one("SELECT to_regclass('mikkoo.dead_letter') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(dead_letter);
}

/// The event PgQ stores for `ev_id` in `queue`: (ev_type, ev_data, extra1, extra2, extra3, extra4).
async fn stored_event(
    client: &Client,
    queue: &str,
    ev_id: i64,
) -> (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    let row = client
        .query_one(
            "SELECT e.ev_type, e.ev_data, e.ev_extra1, e.ev_extra2, e.ev_extra3, e.ev_extra4 \
             FROM pgq.event_template e, pgq.queue q \
             WHERE q.queue_name = $1 AND e.ev_id = $2 \
               AND e.tableoid::regclass::text ~ ('^' || q.queue_data_pfx || '_[0-9]+$')",
            &[&queue, &ev_id],
        )
        .await
        .unwrap();
    (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    )
}

#[tokio::test]
async fn every_function_builds_json_safely_and_null_arguments_are_not_no_ops() {
    let db = Database::create("schema_functions").await;
    install(&db.client).await;
    let queue = "tricky 'quoted' \"queue\"";
    db.client
        .execute("SELECT pgq.create_queue($1)", &[&queue])
        .await
        .unwrap();
    let payload = "{\"quote\": \"it's \\\"fine\\\"\"}";

    let id: i64 = db
        .client
        .query_one(
            "SELECT mikkoo.insert_event($1, 'ex', 'rk', $2, 'application/json')",
            &[&queue, &payload],
        )
        .await
        .unwrap()
        .get(0);
    let (ev_type, ev_data, extra1, extra2, extra3, extra4) = stored_event(&db.client, queue, id).await;
    assert_eq!(
        (ev_type.as_deref(), extra1.as_deref(), extra2.as_deref()),
        (Some("rk"), Some("ex"), Some("application/json"))
    );
    assert_eq!(ev_data.as_deref(), Some(payload));
    let properties: serde_json::Value = serde_json::from_str(&extra3.unwrap()).unwrap();
    assert_eq!(
        Uuid::parse_str(properties["message_id"].as_str().unwrap())
            .unwrap()
            .get_version_num(),
        4
    );
    let headers: serde_json::Value = serde_json::from_str(&extra4.unwrap()).unwrap();
    assert_eq!(
        headers["pgq_queue"], queue,
        "a queue name with quotes survives JSON"
    );

    let id: i64 = db
        .client
        .query_one(
            "SELECT mikkoo.insert_event($1, NULL, 'rk', NULL, NULL, NULL, NULL)",
            &[&queue],
        )
        .await
        .unwrap()
        .get::<_, Option<i64>>(0)
        .expect("NULL optional arguments still queue the event");
    let (_, ev_data, extra1, _, extra3, extra4) = stored_event(&db.client, queue, id).await;
    assert_eq!((ev_data, extra1, extra3, extra4), (None, None, None, None));
    let id: i64 = db
        .client
        .query_one(
            "SELECT mikkoo.insert_event($1, 'ex', 'rk', 'body', NULL, '{\"priority\": 3}', '{\"h\": 1}')",
            &[&queue],
        )
        .await
        .unwrap()
        .get(0);
    let (_, _, _, _, extra3, extra4) = stored_event(&db.client, queue, id).await;
    assert_eq!(
        (extra3.as_deref(), extra4.as_deref()),
        (Some("{\"priority\": 3}"), Some("{\"h\": 1}"))
    );

    let id: i64 = db
        .client
        .query_one(
            "SELECT mikkoo.insert_audited_event($1, NULL, 'rk', $2, NULL)",
            &[&queue, &payload],
        )
        .await
        .unwrap()
        .get::<_, Option<i64>>(0)
        .expect("insert_audited_event with a NULL exchange still queues");
    let (_, _, _, _, extra3, _) = stored_event(&db.client, queue, id).await;
    let message_id: String =
        serde_json::from_str::<serde_json::Value>(&extra3.unwrap()).unwrap()["message_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let audit = db
        .client
        .query_one(
            "SELECT event_id, queue, exchange, payload, confirmed_at IS NULL FROM mikkoo.audit WHERE message_id = $1::text::uuid",
            &[&message_id],
        )
        .await
        .unwrap();
    assert_eq!(audit.get::<_, i64>(0), id);
    assert_eq!(audit.get::<_, String>(1), queue);
    assert_eq!(audit.get::<_, Option<String>>(2), None);
    assert_eq!(audit.get::<_, String>(3), payload);
    assert!(audit.get::<_, bool>(4));

    let manual = Uuid::new_v4().to_string();
    let row = db
        .client
        .query_one(
            "SELECT (mikkoo.new_audit_record($1::text::uuid, 42, $2, NULL, NULL, NULL, NULL, NULL, NULL)).event_id",
            &[&manual, &queue],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    let deleted = |id: String| {
        let client = &db.client;
        async move {
            client
                .query_one("SELECT mikkoo.delete_audit_record($1::text::uuid)", &[&id])
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(deleted(manual.clone()).await);
    assert!(!deleted(manual).await, "a second delete finds nothing");
}

/// A queue bound to `exchange` that the test does not consume (for `audit consume`).
async fn parked_queue(exchange: &str) -> String {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    let connection = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let name = unique("audit_parked");
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    name
}

#[tokio::test]
async fn audited_events_are_confirmed_received_and_reported() {
    install_in_main_database().await;
    let queue = PgQueue::create("audit_flow").await;
    let mut sink = Sink::topic("audit_flow").await;
    let parked = parked_queue(&sink.exchange).await;
    let config = config_yaml(&[worker_yaml(&queue.name, "audit: true")]);
    // The operator's file has a second worker on the same servers: `audit consume`
    // needs no --worker for that.
    let other_queue = format!("{}_other", queue.name);
    let (_dir, path) = write_config(&config_yaml(&[
        worker_yaml(&queue.name, "audit: true"),
        worker_yaml(&other_queue, ""),
    ]));
    let path = path.to_str().unwrap().to_owned();
    let mut relay = Relay::start(&config);
    let mut ids = Vec::new();
    for i in 0..3 {
        let row = queue
            .client
            .query_one(
                "SELECT mikkoo.insert_audited_event($1, $2, 'audited', $3, 'text/plain')",
                &[&queue.name, &sink.exchange, &format!("audited-{i}")],
            )
            .await
            .unwrap();
        ids.push(row.get::<_, i64>(0));
    }
    queue.tick().await;
    sink.take(3).await;
    queue.wait_drained().await;
    let confirmed: i64 = queue
        .client
        .query_one(
            "SELECT count(*) FROM mikkoo.audit WHERE queue = $1 AND event_id = ANY($2) AND confirmed_at IS NOT NULL",
            &[&queue.name, &ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        confirmed, 3,
        "confirmed_at is set in the transaction that finished the batch"
    );
    assert!(relay.stop().await.success());

    // Confirmed but not received: the report says so, and exits 1.
    let report = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&args)
        })
    };
    let args = |extra: &[&str]| -> Vec<String> {
        let mut all = vec![
            "audit".to_owned(),
            "report".to_owned(),
            "-c".to_owned(),
            path.clone(),
        ];
        all.extend(extra.iter().map(|s| (*s).to_owned()));
        all
    };
    let (status, stdout, _) = report(args(&["--older-than", "0s", "--json"])).await.unwrap();
    assert_eq!(status.code(), Some(1), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mine = |list: &serde_json::Value| {
        list.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["queue"] == queue.name.as_str())
            .count()
    };
    assert_eq!(mine(&json["unreceived"]), 3, "{json}");
    assert_eq!(mine(&json["unconfirmed"]), 0, "{json}");

    // audit consume marks them received from the queue they were routed to.
    let consume = {
        let path = path.clone();
        let parked = parked.clone();
        tokio::task::spawn_blocking(move || {
            run_cli(&[
                "audit",
                "consume",
                "-c",
                &path,
                "--amqp-queue",
                &parked,
                "--idle-exit",
                "2s",
            ])
        })
    };
    let (status, stdout, stderr) = consume.await.unwrap();
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 audit row(s) marked received"), "{stdout}");
    let received: i64 = queue
        .client
        .query_one(
            "SELECT count(*) FROM mikkoo.audit WHERE queue = $1 AND received_at IS NOT NULL",
            &[&queue.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(received, 3);

    // Workers on different brokers: which one to consume from must be said.
    let (_split_dir, split_path) = write_config(&config_yaml(&[
        worker_yaml(&queue.name, "audit: true"),
        worker_yaml_via(&other_queue, "", "host: localhost, port: 5672"),
    ]));
    let (status, _, stderr) = run_cli(&[
        "audit",
        "consume",
        "-c",
        split_path.to_str().unwrap(),
        "--amqp-queue",
        &parked,
    ]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("choose whose to use with --worker QUEUE"),
        "{stderr}"
    );

    // An audited event no relay confirmed yet shows up as unconfirmed.
    queue
        .client
        .query_one(
            "SELECT mikkoo.insert_audited_event($1, 'x', 'k', 'waiting', NULL)",
            &[&queue.name],
        )
        .await
        .unwrap();
    let (status, stdout, _) = report(args(&["--older-than", "0s", "--json"])).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(mine(&json["unconfirmed"]), 1, "{json}");
    assert_eq!(mine(&json["unreceived"]), 0, "{json}");
    let (status, stdout, _) = report(args(&["--older-than", "1h"])).await.unwrap();
    let clean_elsewhere = !stdout.contains(&queue.name);
    assert!(clean_elsewhere, "nothing of this test is an hour old: {stdout}");
    if status.success() {
        assert!(stdout.contains("not confirmed after 3600s: 0"), "{stdout}");
    }
    queue
        .client
        .execute("DELETE FROM mikkoo.audit WHERE queue = $1", &[&queue.name])
        .await
        .unwrap();
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_with_their_message_id() {
    let queue = PgQueue::create("dl_replay").await;
    let mut sink = Sink::bound("dl_replay", &["good"]).await;
    let config = config_yaml(&[worker_yaml(&queue.name, "max_failures: 0")]);
    let (_dir, path) = write_config(&config);
    let path = path.to_str().unwrap().to_owned();
    let mut relay = Relay::start(&config);
    let mut queue = queue;
    let ids = queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "later", "first-try"),
            NewEvent::to(&sink.exchange, "good", "ok"),
        ])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "ok");
    queue.wait_drained().await;

    let list = {
        let path = path.clone();
        let name = queue.name.clone();
        tokio::task::spawn_blocking(move || {
            run_cli(&["dead-letter", "list", "-c", &path, "--queue", &name, "--json"])
        })
    };
    let (status, stdout, stderr) = list.await.unwrap();
    assert!(status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let letters = json["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{json}");
    assert_eq!(letters[0]["ev_id"], ids[0]);
    assert_eq!(letters[0]["routing_key"], "later");
    assert_eq!(letters[0]["body_preview"], "first-try");
    assert!(letters[0]["reason"].as_str().unwrap().starts_with("NO_ROUTE"));
    let row_id = letters[0]["id"].as_i64().unwrap();
    let table = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || run_cli(&["dead-letter", "list", "-c", &path]))
    };
    let (_, table, _) = table.await.unwrap();
    assert!(
        table.contains("NO_ROUTE") && table.contains("first-try"),
        "{table}"
    );

    // An unknown id replays nothing.
    let bad = {
        let path = path.clone();
        let name = queue.name.clone();
        tokio::task::spawn_blocking(move || {
            run_cli(&[
                "dead-letter",
                "replay",
                "-c",
                &path,
                "--queue",
                &name,
                "--id",
                "999999999",
            ])
        })
    };
    let (status, _, stderr) = bad.await.unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("nothing was replayed"), "{stderr}");

    // Make it routable, then replay it: delivered, with the original message id.
    sink.bind("later").await;
    let replay = {
        let path = path.clone();
        let name = queue.name.clone();
        let id = row_id.to_string();
        tokio::task::spawn_blocking(move || {
            run_cli(&[
                "dead-letter",
                "replay",
                "-c",
                &path,
                "--queue",
                &name,
                "--id",
                &id,
            ])
        })
    };
    let (status, stdout, stderr) = replay.await.unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("replayed 1 dead letter(s)"), "{stdout}");
    queue.tick().await;
    let delivery = sink.take(1).await.remove(0);
    assert_eq!(body(&delivery), "first-try");
    let system_id: String = queue
        .client
        .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);
    let namespace = Uuid::new_v5(
        &Uuid::from_u128(0x6d69_6b6b_6f6f_4d49_8b4b_4f4f_2d49_4421),
        format!("{system_id}/{}", queue.name).as_bytes(),
    );
    let original = Uuid::new_v5(&namespace, ids[0].to_string().as_bytes()).to_string();
    assert_eq!(
        delivery.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(original.as_str())
    );
    assert!(queue.dead_letters().await.is_empty(), "replayed rows are deleted");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn dead_letters_can_go_to_an_exchange_with_the_failure_in_headers() {
    let mut queue = PgQueue::create("dl_exchange").await;
    let mut sink = Sink::topic("dl_exchange").await;
    let mut dead = Sink::topic("dl_exchange_dead").await;
    let worker = worker_yaml(
        &queue.name,
        &format!("dead_letter: {{exchange: {}, routing_key: dead}}", dead.exchange),
    );
    let mut relay = Relay::start(&config_yaml(&[worker]));
    let ids = queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "orders", "bad-one")
                .properties(r#"{"priority": "high"}"#)
                .headers(r#"{"h": 1}"#),
            NewEvent::to(&sink.exchange, "orders", "good-one"),
        ])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "good-one");
    let letter = dead.take(1).await.remove(0);
    assert_eq!(body(&letter), "bad-one");
    assert_eq!(letter.routing_key.as_str(), "dead");
    assert!(
        header_text(&letter, "x-mikkoo-reason")
            .unwrap()
            .starts_with("ev_extra3: priority must be 0-255")
    );
    assert_eq!(
        header_text(&letter, "x-mikkoo-queue").as_deref(),
        Some(queue.name.as_str())
    );
    assert_eq!(
        header_text(&letter, "x-mikkoo-exchange").as_deref(),
        Some(sink.exchange.as_str())
    );
    assert_eq!(
        header_text(&letter, "x-mikkoo-routing-key").as_deref(),
        Some("orders")
    );
    assert_eq!(
        header_text(&letter, "x-mikkoo-properties").as_deref(),
        Some(r#"{"priority": "high"}"#)
    );
    assert_eq!(
        header(&letter, "x-mikkoo-ev-id"),
        Some(&AMQPValue::LongInt(i32::try_from(ids[0]).unwrap())),
        "integers that fit are signed 32-bit (SPEC §11)"
    );
    assert!(
        matches!(header(&letter, "x-mikkoo-ev-txid"), Some(AMQPValue::LongInt(_))),
        "{:?}",
        header(&letter, "x-mikkoo-ev-txid")
    );
    queue.wait_drained().await;
    assert!(queue.dead_letters().await.is_empty(), "nothing went to the table");
    assert!(relay.stop().await.success());
}

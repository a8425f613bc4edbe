//! Declares an exchange and a queue bound to it, then prints each message RabbitMQ
//! delivers (routing, properties, headers, body) until `--count` have arrived.
//!
//! Used by `scripts/quickstart` to show what the relay published:
//!
//! ```text
//! cargo run --example show_messages -- --exchange demo --queue demo --count 3
//! ```

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

struct Args {
    url: String,
    exchange: String,
    queue: String,
    count: usize,
    timeout: Duration,
    ready_file: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        exchange: "demo".into(),
        queue: "demo".into(),
        count: 3,
        timeout: Duration::from_secs(60),
        ready_file: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--exchange" => args.exchange = value()?,
            "--queue" => args.queue = value()?,
            "--count" => args.count = value()?.parse().map_err(|_| "--count takes a number")?,
            "--timeout" => {
                args.timeout = Duration::from_secs(value()?.parse().map_err(|_| "--timeout takes seconds")?)
            }
            "--ready-file" => args.ready_file = Some(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn show(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => format!("{:?}", String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Double(d) => d.to_string(),
        AMQPValue::Void => "null".into(),
        other => format!("{other:?}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let connection = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            args.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            args.queue.as_str().into(),
            args.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Start clean: messages left from an earlier run would be shown as this run's.
    channel
        .queue_purge(
            args.queue.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "show_messages".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if let Some(path) = &args.ready_file {
        std::fs::write(path, "ready\n")?;
    }
    println!(
        "waiting for {} message(s) on queue {:?} (bound to exchange {:?})",
        args.count, args.queue, args.exchange
    );
    let mut seen = 0;
    while seen < args.count {
        let delivery = match tokio::time::timeout(args.timeout, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => return Err("the consumer was cancelled".into()),
            Err(_) => return Err(format!("no message within {:?}", args.timeout).into()),
        };
        seen += 1;
        let p = &delivery.properties;
        let text =
            |v: &Option<lapin::types::ShortString>| v.as_ref().map_or("-".to_owned(), |s| s.to_string());
        println!("--- message {seen} ---");
        println!("exchange:       {}", delivery.exchange);
        println!("routing key:    {}", delivery.routing_key);
        println!("app_id:         {}", text(p.app_id()));
        println!("content_type:   {}", text(p.content_type()));
        println!("message_id:     {}", text(p.message_id()));
        println!("correlation_id: {}", text(p.correlation_id()));
        println!(
            "timestamp:      {}",
            p.timestamp().map_or("-".to_owned(), |t| t.to_string())
        );
        println!(
            "delivery_mode:  {}",
            p.delivery_mode().map_or("-".to_owned(), |m| m.to_string())
        );
        println!(
            "priority:       {}",
            p.priority().map_or("-".to_owned(), |m| m.to_string())
        );
        println!("type:           {}", text(p.kind()));
        if let Some(headers) = p.headers() {
            for (name, value) in headers.inner() {
                println!("header {name:<9} {}", show(value));
            }
        }
        println!("body:           {}", String::from_utf8_lossy(&delivery.data));
        delivery.ack(BasicAckOptions::default()).await?;
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}

//! The statsd reporter: every second, each worker's counter deltas, gauges and mean
//! timings as statsd lines, over UDP (datagrams of whole lines) or one TCP connection
//! (re-opened when it drops). Never a packet per event: the workers only bump atomics.
//!
//! A statsd server that is down costs nothing but a warning: lines are dropped, the
//! relay goes on.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::config::{StatsdConfig, StatsdProtocol};
use crate::metrics::{self, StatsdState};
use crate::stats::Registry;

/// Largest UDP payload sent: fits an Ethernet MTU with IP and UDP headers.
const MAX_DATAGRAM: usize = 1432;

/// Where lines go.
enum Transport {
    Udp(UdpSocket),
    Tcp {
        address: String,
        stream: Option<TcpStream>,
    },
}

/// Runs until `stop`, then sends a last flush.
pub async fn run(config: StatsdConfig, registry: Arc<Registry>, stop: CancellationToken) {
    let address = format!("{}:{}", config.host, config.port);
    let mut transport = match config.protocol {
        StatsdProtocol::Udp => match udp_socket(&address).await {
            Ok(socket) => Transport::Udp(socket),
            Err(error) => {
                tracing::warn!(%address, %error, "statsd disabled: cannot reach the statsd host");
                return;
            }
        },
        StatsdProtocol::Tcp => Transport::Tcp {
            address,
            stream: None,
        },
    };
    let host = config
        .include_hostname
        .then(|| crate::host::fqdn().replace('.', "_"));
    let mut states: HashMap<String, StatsdState> = HashMap::new();
    let mut ticker = tokio::time::interval(metrics::STATSD_FLUSH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = stop.cancelled() => true,
        };
        let mut lines = Vec::new();
        for stats in registry.workers() {
            let scope = scope(&config.prefix, host.as_deref(), &stats.queue);
            let state = states.entry(stats.queue.clone()).or_default();
            lines.extend(metrics::statsd_lines(&stats, &scope, state));
        }
        transport.send(&lines).await;
        if stopping {
            return;
        }
    }
}

async fn udp_socket(address: &str) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    socket.connect(address).await?;
    Ok(socket)
}

/// `<prefix>[.<host>].<queue>`; an empty prefix is left out.
fn scope(prefix: &str, host: Option<&str>, queue: &str) -> String {
    [Some(prefix), host, Some(queue)]
        .into_iter()
        .flatten()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(".")
}

impl Transport {
    async fn send(&mut self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        match self {
            Transport::Udp(socket) => {
                for datagram in pack(lines, MAX_DATAGRAM) {
                    // A statsd server that is not listening makes sends fail; that is
                    // not the relay's problem.
                    let _ = socket.send(datagram.as_bytes()).await;
                }
            }
            Transport::Tcp { address, stream } => {
                let mut text = lines.join("\n");
                text.push('\n');
                if stream.is_none() {
                    match TcpStream::connect(address.as_str()).await {
                        Ok(connected) => *stream = Some(connected),
                        Err(error) => {
                            tracing::warn!(%address, %error, "cannot reach statsd over TCP; dropping this flush");
                            return;
                        }
                    }
                }
                if let Some(connected) = stream
                    && let Err(error) = connected.write_all(text.as_bytes()).await
                {
                    tracing::warn!(%address, %error, "statsd TCP connection lost; reconnecting next flush");
                    *stream = None;
                }
            }
        }
    }
}

/// Joins lines into payloads of at most `limit` bytes (a longer line goes alone).
fn pack(lines: &[String], limit: usize) -> Vec<String> {
    let mut datagrams = Vec::new();
    let mut current = String::new();
    for line in lines {
        if !current.is_empty() && current.len() + 1 + line.len() > limit {
            datagrams.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        datagrams.push(current);
    }
    datagrams
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_leaves_out_what_is_not_configured() {
        assert_eq!(scope("mikkoo", None, "invoices"), "mikkoo.invoices");
        assert_eq!(
            scope("mikkoo", Some("relay_1"), "invoices"),
            "mikkoo.relay_1.invoices"
        );
        assert_eq!(scope("", None, "invoices"), "invoices");
    }

    #[test]
    fn lines_are_packed_into_datagrams_without_splitting_one() {
        let lines: Vec<String> = (0..10).map(|i| format!("metric.{i}:1|c")).collect();
        let datagrams = pack(&lines, 40);
        assert!(datagrams.iter().all(|d| d.len() <= 40));
        assert_eq!(datagrams.join("\n").split('\n').count(), 10);
        let long = vec!["x".repeat(50)];
        assert_eq!(pack(&long, 40), long);
    }
}

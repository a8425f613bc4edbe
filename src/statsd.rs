//! The statsd reporter: every second, each worker's counter deltas, gauges and mean
//! timings as statsd lines, over UDP (datagrams of whole lines) or one TCP connection.
//! Never a packet per event: the workers only bump atomics.
//!
//! A statsd server that is down or cannot be resolved costs nothing but one warning per
//! outage: the reporter keeps trying (with [`Outage`]'s backoff, up to 30 s apart, resolving the
//! name again each time) and meanwhile sends nothing, so the counters go on adding up
//! and the first flush that gets through carries everything since the last one.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Outage;
use crate::config::{StatsdConfig, StatsdProtocol};
use crate::metrics::{self, StatsdState};
use crate::stats::Registry;

/// Largest UDP payload sent: fits an Ethernet MTU with IP and UDP headers.
const MAX_DATAGRAM: usize = 1432;

/// How long connecting (name resolution included) or writing may take: a statsd host
/// that does not answer must not hold up the flushes, or shutdown, for minutes.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs until `stop`, then sends a last flush.
pub async fn run(config: StatsdConfig, registry: Arc<Registry>, stop: CancellationToken) {
    let mut destination = Destination::new(&config);
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
        // Figures are read only when they can be sent: what is not read stays in the
        // counters for the next flush.
        if destination.ready(stopping).await {
            let sent_before = states.clone();
            let lines = collect_lines(&registry, &config.prefix, host.as_deref(), &mut states);
            if destination.send(&lines).await == Flush::Unsent {
                states = sent_before;
            }
        }
        if stopping {
            return;
        }
    }
}

/// Every worker's lines since the last flush; `states` forgets workers that are gone.
fn collect_lines(
    registry: &Registry,
    prefix: &str,
    host: Option<&str>,
    states: &mut HashMap<String, StatsdState>,
) -> Vec<String> {
    let workers = registry.workers();
    states.retain(|queue, _| workers.iter().any(|stats| stats.queue == *queue));
    let mut lines = Vec::new();
    for stats in &workers {
        let scope = scope(prefix, host, &stats.queue);
        let state = states.entry(stats.queue.clone()).or_default();
        lines.extend(metrics::statsd_lines(stats, &scope, state));
    }
    lines
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

/// An open socket to the statsd server.
enum Socket {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

/// What became of one flush.
#[derive(Debug, PartialEq, Eq)]
enum Flush {
    /// All of it went out (or there was nothing to send).
    Sent,
    /// None of it went out: its figures belong to the next flush.
    Unsent,
    /// Some datagrams went out before one failed; resending would count them twice.
    PartlySent,
}

/// The statsd server: a socket while it can be reached, else when to try again.
struct Destination {
    address: String,
    protocol: StatsdProtocol,
    socket: Option<Socket>,
    /// Warned about once when it starts; the backoff between attempts.
    outage: Outage,
    retry_at: Instant,
}

impl Destination {
    fn new(config: &StatsdConfig) -> Self {
        Destination {
            address: format!("{}:{}", config.host, config.port),
            protocol: config.protocol,
            socket: None,
            outage: Outage::default(),
            retry_at: Instant::now(),
        }
    }

    /// True when figures can be sent now, opening a socket if the backoff allows
    /// (`last_flush` ignores the backoff and the UDP probe's wait: it is the last chance).
    async fn ready(&mut self, last_flush: bool) -> bool {
        if self.socket.is_some() {
            return true;
        }
        if !last_flush && Instant::now() < self.retry_at {
            return false;
        }
        match tokio::time::timeout(IO_TIMEOUT, open(self.protocol, &self.address)).await {
            Ok(Ok(socket)) => self.socket = Some(socket),
            Ok(Err(error)) => self.failed("cannot reach the statsd server", &error),
            Err(_) => self.failed("cannot reach the statsd server", &"timed out"),
        }
        // A new UDP socket has sent only its probe: figures wait a flush, so that a
        // server that is not listening refuses the next send (and the figures stay
        // here) instead of swallowing them.
        self.socket.is_some() && (last_flush || self.protocol == StatsdProtocol::Tcp)
    }

    /// Sends `lines` on the open socket; on failure the socket is dropped so the next
    /// flush connects (and resolves the name) again.
    async fn send(&mut self, lines: &[String]) -> Flush {
        if lines.is_empty() {
            return Flush::Sent;
        }
        let Some(socket) = &mut self.socket else {
            return Flush::Unsent;
        };
        let result = match socket {
            Socket::Udp(socket) => send_datagrams(socket, lines).await,
            Socket::Tcp(stream) => write_lines(stream, lines).await,
        };
        match result {
            Ok(()) => {
                self.delivered();
                Flush::Sent
            }
            Err((flush, error)) => {
                self.socket = None;
                self.failed("statsd flush failed", &error);
                flush
            }
        }
    }

    /// Notes a failure: a warning for the first of an outage, then debug lines only.
    fn failed(&mut self, what: &str, error: &dyn fmt::Display) {
        let (retry_in, began) = self.outage.failed();
        self.retry_at = Instant::now() + retry_in;
        let address = &self.address;
        if began {
            tracing::warn!(%address, %error, "{what}; figures are kept and sent once it answers");
        } else {
            tracing::debug!(%address, %error, ?retry_in, "{what}");
        }
    }

    /// Notes a flush that got through, ending an outage.
    fn delivered(&mut self) {
        if let Some(down_for) = self.outage.ended() {
            tracing::info!(address = %self.address, ?down_for, "statsd server reachable again");
        }
    }
}

async fn open(protocol: StatsdProtocol, address: &str) -> std::io::Result<Socket> {
    Ok(match protocol {
        StatsdProtocol::Udp => {
            let socket = UdpSocket::bind("0.0.0.0:0").await?;
            socket.connect(address).await?;
            // An empty datagram, which statsd servers skip: if nothing listens, the
            // refusal comes back and fails the next send (UDP connect alone proves
            // nothing but that the name resolved).
            socket.send(&[]).await?;
            Socket::Udp(socket)
        }
        StatsdProtocol::Tcp => Socket::Tcp(TcpStream::connect(address).await?),
    })
}

/// Sends `lines` as datagrams. A failure says whether any datagram went out first.
async fn send_datagrams(socket: &UdpSocket, lines: &[String]) -> Result<(), (Flush, std::io::Error)> {
    for (index, datagram) in pack(lines, MAX_DATAGRAM).iter().enumerate() {
        // A server that is not listening shows as a refused send (the ICMP answer to
        // an earlier datagram): the server is down, like a failed TCP connect.
        if let Err(error) = socket.send(datagram.as_bytes()).await {
            let flush = if index == 0 {
                Flush::Unsent
            } else {
                Flush::PartlySent
            };
            return Err((flush, error));
        }
    }
    Ok(())
}

/// Writes `lines`, newline-terminated, as one write.
async fn write_lines(stream: &mut TcpStream, lines: &[String]) -> Result<(), (Flush, std::io::Error)> {
    let mut text = lines.join("\n");
    text.push('\n');
    // A write on a connection known to be dead fails before any of it is taken, so the
    // figures can go with the next flush. (The first write after the server went away
    // usually succeeds and is lost: TCP learns of the loss from that write.)
    match tokio::time::timeout(IO_TIMEOUT, stream.write_all(text.as_bytes())).await {
        Ok(result) => result.map_err(|error| (Flush::Unsent, error)),
        Err(_) => Err((
            Flush::PartlySent,
            std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"),
        )),
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

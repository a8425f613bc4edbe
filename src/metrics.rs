//! Metric names, in one place, and the two ways they leave the process: Prometheus text
//! for `/metrics` and statsd lines.
//!
//! Every metric is labelled by queue only (the worker's PgQ queue) — never by exchange
//! or routing key, whose number nobody bounds. statsd gets the same facts as
//! `<prefix>[.<host>].<queue>.counters.<name>`, `.gauges.<name>` and `.timers.<name>`.

use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::stats::{Counter, Histogram, HistogramSnapshot, WorkerStats};

/// A counter: its statsd name and how to read it.
pub struct CounterMetric {
    /// statsd name (`amqp.connection_opened`); Prometheus turns dots into underscores
    /// and adds `mikkoo_` and `_total`.
    pub name: &'static str,
    /// Prometheus HELP text.
    pub help: &'static str,
    /// Reads the counter.
    pub read: fn(&WorkerStats) -> &Counter,
}

/// Every counter.
pub const COUNTERS: &[CounterMetric] = &[
    CounterMetric {
        name: "processed",
        help: "Events confirmed by RabbitMQ.",
        read: |s| &s.processed,
    },
    CounterMetric {
        name: "failed",
        help: "Publish attempts that failed (nack, returned, channel error).",
        read: |s| &s.failed,
    },
    CounterMetric {
        name: "retried",
        help: "Events handed to PgQ's retry queue.",
        read: |s| &s.retried,
    },
    CounterMetric {
        name: "dead_lettered",
        help: "Events dead-lettered or discarded.",
        read: |s| &s.dead_lettered,
    },
    CounterMetric {
        name: "rejected",
        help: "Events whose metadata cannot make an AMQP message.",
        read: |s| &s.rejected,
    },
    CounterMetric {
        name: "batches",
        help: "PgQ batches finished.",
        read: |s| &s.batches,
    },
    CounterMetric {
        name: "empty_queue",
        help: "next_batch calls that found no batch.",
        read: |s| &s.empty_queue,
    },
    CounterMetric {
        name: "amqp.connection_opened",
        help: "AMQP connections opened.",
        read: |s| &s.connections_opened,
    },
    CounterMetric {
        name: "amqp.connection_closed",
        help: "AMQP connections lost or closed.",
        read: |s| &s.connections_closed,
    },
    CounterMetric {
        name: "amqp.connection_blocked",
        help: "Times RabbitMQ blocked the connection.",
        read: |s| &s.connections_blocked,
    },
    CounterMetric {
        name: "amqp.message_returned",
        help: "Unroutable messages returned by RabbitMQ.",
        read: |s| &s.returned,
    },
    CounterMetric {
        name: "amqp.nacked",
        help: "Messages RabbitMQ negatively acknowledged.",
        read: |s| &s.nacked,
    },
];

/// A gauge: its name, help, and how to read it (`None` while unknown).
pub struct GaugeMetric {
    /// statsd and Prometheus name (after `mikkoo_`).
    pub name: &'static str,
    /// Prometheus HELP text.
    pub help: &'static str,
    /// Reads the gauge.
    pub read: fn(&WorkerStats) -> Option<f64>,
}

/// Every gauge.
pub const GAUGES: &[GaugeMetric] = &[
    GaugeMetric {
        name: "pending_events",
        help: "Events PgQ has not handed to the consumer yet (PgQ's estimate).",
        read: |s| s.pending_events().map(|n| n as f64),
    },
    GaugeMetric {
        name: "lag_seconds",
        help: "Age of the last tick the consumer finished.",
        read: |s| s.lag().map(|lag| lag.as_secs_f64()),
    },
    GaugeMetric {
        name: "in_flight",
        help: "Messages published and not yet confirmed.",
        read: |s| Some(s.in_flight() as f64),
    },
    GaugeMetric {
        name: "blocked",
        help: "1 while RabbitMQ blocks the connection's publishing (connection.blocked), else 0.",
        read: |s| Some(if s.blocked().is_some() { 1.0 } else { 0.0 }),
    },
];

/// A histogram: Prometheus name, statsd timer name, help, how to read it.
pub struct HistogramMetric {
    /// Prometheus name (after `mikkoo_`).
    pub name: &'static str,
    /// statsd timer name (milliseconds), if it is a duration.
    pub timer: Option<&'static str>,
    /// Prometheus HELP text.
    pub help: &'static str,
    /// Reads the histogram.
    pub read: fn(&WorkerStats) -> &Histogram,
}

/// Every histogram.
pub const HISTOGRAMS: &[HistogramMetric] = &[
    HistogramMetric {
        name: "batch_size",
        timer: None,
        help: "Events per finished batch.",
        read: |s| &s.batch_size,
    },
    HistogramMetric {
        name: "batch_duration_seconds",
        timer: Some("batch_duration"),
        help: "Time from next_batch to the batch's commit.",
        read: |s| &s.batch_duration,
    },
    HistogramMetric {
        name: "confirm_latency_seconds",
        timer: Some("confirm_latency"),
        help: "Time from publishing a message to its confirm.",
        read: |s| &s.confirm_latency,
    },
];

fn prometheus_name(name: &str) -> String {
    format!("mikkoo_{}", name.replace('.', "_"))
}

/// Escapes a label value for the Prometheus text format.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of every worker's metrics.
pub fn prometheus(workers: &[Arc<WorkerStats>]) -> String {
    let mut out = String::with_capacity(4096);
    for counter in COUNTERS {
        let name = format!("{}_total", prometheus_name(counter.name));
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", counter.help);
        for stats in workers {
            let _ = writeln!(
                out,
                "{name}{{queue=\"{}\"}} {}",
                label(&stats.queue),
                (counter.read)(stats).get()
            );
        }
    }
    for gauge in GAUGES {
        let name = prometheus_name(gauge.name);
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} gauge", gauge.help);
        for stats in workers {
            if let Some(value) = (gauge.read)(stats) {
                let _ = writeln!(out, "{name}{{queue=\"{}\"}} {value}", label(&stats.queue));
            }
        }
    }
    let connected = prometheus_name("connected");
    let _ = writeln!(
        out,
        "# HELP {connected} 1 while the worker's connection to the server is up.\n# TYPE {connected} gauge"
    );
    for stats in workers {
        let queue = label(&stats.queue);
        let _ = writeln!(
            out,
            "{connected}{{queue=\"{queue}\",server=\"postgresql\"}} {}",
            u8::from(stats.postgres_connected())
        );
        let _ = writeln!(
            out,
            "{connected}{{queue=\"{queue}\",server=\"rabbitmq\"}} {}",
            u8::from(stats.broker_connected())
        );
    }
    let active = prometheus_name("active");
    let _ = writeln!(
        out,
        "# HELP {active} 1 while the worker is the active instance for its queue.\n# TYPE {active} gauge"
    );
    for stats in workers {
        let is_active = stats.state() != crate::stats::WorkerState::Standby;
        let _ = writeln!(
            out,
            "{active}{{queue=\"{}\"}} {}",
            label(&stats.queue),
            u8::from(is_active)
        );
    }
    for histogram in HISTOGRAMS {
        let name = prometheus_name(histogram.name);
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", histogram.help);
        for stats in workers {
            write_histogram(
                &mut out,
                &name,
                &label(&stats.queue),
                &(histogram.read)(stats).snapshot(),
            );
        }
    }
    out
}

fn write_histogram(out: &mut String, name: &str, queue: &str, snapshot: &HistogramSnapshot) {
    for (bound, count) in &snapshot.buckets {
        let le = if bound.is_infinite() {
            "+Inf".to_owned()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{queue=\"{queue}\",le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum{{queue=\"{queue}\"}} {}", snapshot.sum);
    let _ = writeln!(out, "{name}_count{{queue=\"{queue}\"}} {}", snapshot.count);
}

/// What statsd was last sent for one worker, to send differences next time.
#[derive(Clone, Debug, Default)]
pub struct StatsdState {
    /// The stats the figures below were read from. A worker restarted by a reload gets
    /// new stats counting from zero; comparing them with the old figures would drop the
    /// new worker's first counts. (A `Weak` keeps the old allocation, so its address
    /// cannot be reused by the new stats and fool the comparison.)
    source: Weak<WorkerStats>,
    counters: Vec<u64>,
    timers: Vec<(f64, u64)>,
}

/// The statsd lines for one worker since `previous` (updated in place): counter
/// deltas (only those that moved), every known gauge, and for each duration histogram
/// the mean of the new observations as one timer line (never one line per event).
pub fn statsd_lines(stats: &Arc<WorkerStats>, scope: &str, previous: &mut StatsdState) -> Vec<String> {
    if !std::ptr::eq(previous.source.as_ptr(), Arc::as_ptr(stats)) {
        *previous = StatsdState::default();
    }
    let mut lines = Vec::new();
    let counters: Vec<u64> = COUNTERS.iter().map(|c| (c.read)(stats).get()).collect();
    for (index, counter) in COUNTERS.iter().enumerate() {
        let before = previous.counters.get(index).copied().unwrap_or(0);
        let delta = counter_delta(counters[index], before);
        if delta > 0 {
            lines.push(format!("{scope}.counters.{}:{delta}|c", counter.name));
        }
    }
    for gauge in GAUGES {
        if let Some(value) = (gauge.read)(stats) {
            lines.push(format!("{scope}.gauges.{}:{value}|g", gauge.name));
        }
    }
    let mut timers = Vec::new();
    for (index, histogram) in HISTOGRAMS.iter().enumerate() {
        let snapshot = (histogram.read)(stats).snapshot();
        let (mut sum_before, mut count_before) = previous.timers.get(index).copied().unwrap_or((0.0, 0));
        if snapshot.count < count_before {
            // Went backwards: everything observed is new (see `counter_delta`).
            (sum_before, count_before) = (0.0, 0);
        }
        timers.push((snapshot.sum, snapshot.count));
        let new = snapshot.count - count_before;
        if let Some(timer) = histogram.timer
            && new > 0
        {
            let mean_ms = (snapshot.sum - sum_before) / new as f64 * 1000.0;
            lines.push(format!("{scope}.timers.{timer}:{mean_ms:.3}|ms"));
        }
    }
    *previous = StatsdState {
        source: Arc::downgrade(stats),
        counters,
        timers,
    };
    lines
}

/// How much a counter moved since `before`. A counter only goes backwards when it was
/// started again from zero, so all of `now` is new (Prometheus reads resets the same way).
fn counter_delta(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// How often statsd lines are sent.
pub const STATSD_FLUSH: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Arc<WorkerStats> {
        let stats = WorkerStats::new("invoices", Duration::from_secs(1));
        stats.processed.add(5);
        stats.returned.add(1);
        stats.confirm_latency.observe(0.002);
        stats.confirm_latency.observe(0.004);
        stats.set_backlog(7, Duration::from_millis(1500));
        stats
    }

    #[test]
    fn prometheus_text_has_every_family_labelled_by_queue() {
        let text = prometheus(&[stats()]);
        for line in [
            "# TYPE mikkoo_processed_total counter",
            "mikkoo_processed_total{queue=\"invoices\"} 5",
            "mikkoo_amqp_message_returned_total{queue=\"invoices\"} 1",
            "mikkoo_pending_events{queue=\"invoices\"} 7",
            "mikkoo_lag_seconds{queue=\"invoices\"} 1.5",
            "mikkoo_in_flight{queue=\"invoices\"} 0",
            "mikkoo_blocked{queue=\"invoices\"} 0",
            "mikkoo_connected{queue=\"invoices\",server=\"rabbitmq\"} 0",
            "# TYPE mikkoo_confirm_latency_seconds histogram",
            "mikkoo_confirm_latency_seconds_bucket{queue=\"invoices\",le=\"0.0025\"} 1",
            "mikkoo_confirm_latency_seconds_bucket{queue=\"invoices\",le=\"+Inf\"} 2",
            "mikkoo_confirm_latency_seconds_count{queue=\"invoices\"} 2",
            "mikkoo_batch_size_count{queue=\"invoices\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn statsd_sends_deltas_gauges_and_mean_timers() {
        let stats = stats();
        let mut state = StatsdState::default();
        let lines = statsd_lines(&stats, "mikkoo.invoices", &mut state);
        assert!(
            lines.contains(&"mikkoo.invoices.counters.processed:5|c".to_owned()),
            "{lines:?}"
        );
        assert!(lines.contains(&"mikkoo.invoices.counters.amqp.message_returned:1|c".to_owned()));
        assert!(lines.contains(&"mikkoo.invoices.gauges.pending_events:7|g".to_owned()));
        assert!(
            lines.contains(&"mikkoo.invoices.timers.confirm_latency:3.000|ms".to_owned()),
            "{lines:?}"
        );
        stats.processed.add(2);
        let lines = statsd_lines(&stats, "mikkoo.invoices", &mut state);
        assert!(
            lines.contains(&"mikkoo.invoices.counters.processed:2|c".to_owned()),
            "{lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("message_returned")),
            "unchanged counters are not sent"
        );
        assert!(
            !lines.iter().any(|l| l.contains("timers")),
            "no new observations, no timer line"
        );
    }

    #[test]
    fn a_counter_that_went_backwards_sends_its_new_value() {
        assert_eq!(counter_delta(7, 5), 2);
        assert_eq!(counter_delta(3, 5), 3);
        assert_eq!(counter_delta(5, 5), 0);
    }

    #[test]
    fn a_restarted_worker_counts_from_its_first_interval() {
        let mut state = StatsdState::default();
        let old = stats();
        old.connections_opened.add(1);
        statsd_lines(&old, "mikkoo.invoices", &mut state);

        // A reload replaced the worker: new stats, counting again from zero, that have
        // already passed or equalled the old figures.
        let new = WorkerStats::new("invoices", Duration::from_secs(1));
        new.processed.add(9);
        new.returned.add(1);
        new.connections_opened.add(1);
        new.confirm_latency.observe(0.010);
        let lines = statsd_lines(&new, "mikkoo.invoices", &mut state);
        for line in [
            "mikkoo.invoices.counters.processed:9|c",
            "mikkoo.invoices.counters.amqp.message_returned:1|c",
            "mikkoo.invoices.counters.amqp.connection_opened:1|c",
            "mikkoo.invoices.timers.confirm_latency:10.000|ms",
        ] {
            assert!(lines.contains(&line.to_owned()), "missing {line:?} in {lines:?}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

//! One worker per configured queue, and one built-in ticker per database when asked:
//! starting them, restarting a worker that panicked (with backoff), applying a reloaded
//! configuration, and the ordered shutdown. It keeps the [`Registry`] of running workers current.
//!
//! Workers are independent tasks; the supervisor never waits on one to serve another.
//! On reload, workers whose settings did not change are left untouched; removed ones are
//! stopped gracefully (a queue added back waits for its old worker); changed ones are stopped gracefully and started again once the old
//! one has finished, so two workers of one queue never run in one process. A restart is
//! not a stop for good: `unregister: true` does not apply to it (see [`StopSignal`]).
//! `poll_interval` changes reach running workers without a restart.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, TickerConfig, WorkerConfig};
use crate::pgconn::PgTarget;
use crate::stats::{Registry, WorkerStats};
use crate::worker::{StopSignal, Worker};

/// A running worker.
struct RunningWorker {
    /// The settings it runs with (compared on reload).
    config: Arc<WorkerConfig>,
    /// Raised to ask it to stop between batches.
    stop: StopSignal,
    /// What it reports; kept by the worker that replaces it after a reload, so counters
    /// go on from where they were.
    stats: Arc<WorkerStats>,
    /// The task running it (and restarting it after a panic).
    handle: JoinHandle<()>,
    /// Fires once the worker it replaced has stopped (it waits for that to start).
    after: Option<Stopped>,
}

/// Fires once a worker, and every worker of its queue before it, has stopped.
#[derive(Clone)]
struct Stopped(watch::Receiver<bool>);

impl Stopped {
    async fn wait(mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    fn is_done(&self) -> bool {
        *self.0.borrow()
    }
}

/// A running built-in ticker for one database.
struct RunningTicker {
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

/// The set of running workers and tickers.
pub struct Supervisor {
    workers: BTreeMap<String, RunningWorker>,
    /// Built-in tickers by database (`host:port/dbname`).
    tickers: BTreeMap<String, RunningTicker>,
    ticker_config: TickerConfig,
    /// What the workers report, read by `/metrics`, `/readyz`, `/status` and statsd.
    registry: Arc<Registry>,
    /// Value of the `origin` header for every worker.
    origin: String,
    /// How often workers log a status line; running workers follow its changes.
    poll_interval: watch::Sender<Duration>,
    /// Workers and tickers being stopped after a reload, awaited at shutdown.
    retiring: Vec<JoinHandle<()>>,
    /// Workers of queues removed by a reload, until they have stopped: a queue that
    /// comes back waits for its old worker.
    removed: BTreeMap<String, Retired>,
}

/// How a worker starts.
enum Start {
    /// Its queue has no worker: fresh stats.
    Fresh,
    /// It replaces a worker with changed settings: once that one has stopped, with its
    /// stats.
    Replacing(Retired),
    /// Its queue was removed and is back: once the old worker has stopped, with fresh
    /// stats.
    Returning(Retired),
}

/// A worker that ran this long before panicking restarts after the shortest delay again.
const PANIC_BACKOFF_RESET: Duration = Duration::from_secs(60);

impl Supervisor {
    /// Starts a worker for every queue in `config` (and the tickers it asks for).
    pub fn start(config: &Config, origin: String, registry: Arc<Registry>) -> Supervisor {
        let mut supervisor = Supervisor {
            workers: BTreeMap::new(),
            tickers: BTreeMap::new(),
            ticker_config: config.application.ticker.clone(),
            registry,
            origin,
            poll_interval: watch::Sender::new(config.application.poll_interval),
            retiring: Vec::new(),
            removed: BTreeMap::new(),
        };
        for worker in config.application.workers.values() {
            supervisor.spawn(Arc::new(worker.clone()), Start::Fresh);
        }
        if supervisor.workers.is_empty() {
            tracing::warn!("no workers configured (Application.workers is empty); nothing to relay");
        }
        supervisor.apply_tickers(config);
        supervisor
    }

    /// Starts a worker, after the previous worker of its queue has stopped, if any.
    fn spawn(&mut self, config: Arc<WorkerConfig>, start: Start) {
        let fresh_stats = || WorkerStats::new(&config.queue, config.wait_duration);
        let (stop, stats, after) = match start {
            Start::Fresh => (StopSignal::new(), fresh_stats(), None),
            Start::Replacing(previous) => {
                previous.stats.set_wait_duration(config.wait_duration);
                (
                    StopSignal::succeeding(previous.stop),
                    previous.stats,
                    Some(previous.stopped),
                )
            }
            Start::Returning(previous) => (
                StopSignal::succeeding(previous.stop),
                fresh_stats(),
                Some(previous.stopped),
            ),
        };
        self.registry.insert(Arc::clone(&stats));
        let handle = tokio::spawn(keep_running(
            Arc::clone(&config),
            self.origin.clone(),
            self.poll_interval.subscribe(),
            Arc::clone(&stats),
            stop.clone(),
            after.clone(),
        ));
        tracing::info!(queue = %config.queue, "worker started");
        self.workers.insert(
            config.queue.clone(),
            RunningWorker {
                config,
                stop,
                stats,
                handle,
                after,
            },
        );
    }

    /// The stats of every running worker, by queue.
    pub fn stats(&self) -> Vec<Arc<WorkerStats>> {
        self.registry.workers()
    }

    /// Applies a reloaded configuration: new queues start, removed ones stop, changed
    /// ones restart, the rest are untouched; tickers follow the databases.
    pub fn apply(&mut self, config: &Config) {
        self.poll_interval.send_replace(config.application.poll_interval);
        self.retiring.retain(|task| !task.is_finished());
        self.removed.retain(|_, retired| !retired.stopped.is_done());
        let wanted = &config.application.workers;
        let removed: Vec<String> = self
            .workers
            .keys()
            .filter(|queue| !wanted.contains_key(*queue))
            .cloned()
            .collect();
        for queue in removed {
            tracing::info!(queue = %queue, "queue removed from the configuration; stopping its worker");
            if let Some(retired) = self.retire(&queue, Retirement::ForGood) {
                self.forget_once_stopped(retired.clone());
                self.removed.insert(queue, retired);
            }
        }
        for (queue, settings) in wanted {
            match self.workers.get(queue) {
                Some(running) if *running.config == *settings => {}
                Some(_) => self.restart(queue, settings),
                None => {
                    let start = match self.removed.remove(queue) {
                        Some(old) => Start::Returning(old),
                        None => Start::Fresh,
                    };
                    self.spawn(Arc::new(settings.clone()), start);
                }
            }
        }
        self.apply_tickers(config);
    }

    /// Replaces a running worker whose settings changed, once it has stopped.
    fn restart(&mut self, queue: &str, settings: &WorkerConfig) {
        let Some(running) = self.workers.get(queue) else {
            return;
        };
        // A different consumer or database is a new subscription: the old one is left for
        // good (and unregistered, with `unregister: true`).
        let same_subscription = running.config.consumer_name == settings.consumer_name
            && running.config.postgres == settings.postgres;
        let retirement = if same_subscription {
            Retirement::ForRestart
        } else {
            Retirement::ForGood
        };
        tracing::info!(queue = %queue, "worker settings changed; restarting it");
        if let Some(retired) = self.retire(queue, retirement) {
            self.spawn(Arc::new(settings.clone()), Start::Replacing(retired));
        }
    }

    /// Asks a worker to stop and lets it finish in the background.
    fn retire(&mut self, queue: &str, retirement: Retirement) -> Option<Retired> {
        let worker = self.workers.remove(queue)?;
        match retirement {
            Retirement::ForGood => worker.stop.stop(),
            Retirement::ForRestart => worker.stop.stop_for_restart(),
        }
        let (stopped_tx, stopped) = watch::channel(false);
        let after = worker.after;
        self.retiring.push(tokio::spawn(async move {
            stop_within(
                &worker.config.queue,
                worker.handle,
                worker.config.shutdown_timeout,
            )
            .await;
            // Aborted while still waiting for its own predecessor (whose timeout may be
            // longer): the queue is only free once that one has stopped too.
            if let Some(after) = after {
                after.wait().await;
            }
            let _ = stopped_tx.send(true);
        }));
        Some(Retired {
            stopped: Stopped(stopped),
            stop: worker.stop,
            stats: worker.stats,
        })
    }

    /// Drops a removed queue's stats once its worker has stopped, so what it did while
    /// stopping is still reported (unless the queue came back meanwhile).
    fn forget_once_stopped(&mut self, retired: Retired) {
        let registry = Arc::clone(&self.registry);
        self.retiring.push(tokio::spawn(async move {
            retired.stopped.wait().await;
            registry.remove_if_same(&retired.stats);
        }));
    }

    /// Runs one ticker per database the workers use, when the ticker is enabled.
    fn apply_tickers(&mut self, config: &Config) {
        let ticker = &config.application.ticker;
        let mut wanted: BTreeMap<String, PgTarget> = BTreeMap::new();
        if ticker.enabled {
            for worker in config.application.workers.values() {
                let key = format!("{}/{}", worker.postgres.host_port(), worker.postgres.dbname());
                wanted.entry(key).or_insert_with(|| worker.postgres.clone());
            }
        }
        let period_changed = *ticker != self.ticker_config;
        self.ticker_config = ticker.clone();
        let stale: Vec<String> = self
            .tickers
            .keys()
            .filter(|key| period_changed || !wanted.contains_key(*key))
            .cloned()
            .collect();
        for key in stale {
            if let Some(running) = self.tickers.remove(&key) {
                running.stop.cancel();
                self.retiring.push(running.handle);
            }
        }
        for (key, target) in wanted {
            if self.tickers.contains_key(&key) {
                continue;
            }
            let stop = CancellationToken::new();
            let handle = tokio::spawn(crate::ticker::run(target, ticker.period, stop.clone()));
            self.tickers.insert(key, RunningTicker { stop, handle });
        }
    }

    /// Stops every worker and ticker: each worker settles and finishes its open batch
    /// within its `shutdown_timeout`, or is aborted with the batch left open for later.
    pub async fn shutdown(mut self) {
        let queues: Vec<String> = self.workers.keys().cloned().collect();
        for queue in queues {
            self.retire(&queue, Retirement::ForGood);
        }
        for (_, ticker) in std::mem::take(&mut self.tickers) {
            ticker.stop.cancel();
            self.retiring.push(ticker.handle);
        }
        for retiring in self.retiring.drain(..) {
            let _ = retiring.await;
        }
    }
}

/// A worker asked to stop: what its replacement needs.
#[derive(Clone)]
struct Retired {
    /// Fires once it has stopped.
    stopped: Stopped,
    /// Its stop signal (a stop for good of the replacement reaches it too).
    stop: StopSignal,
    stats: Arc<WorkerStats>,
}

/// Why a worker is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retirement {
    /// Shutdown, or its queue left the configuration.
    ForGood,
    /// Its settings changed: a new worker takes over once it has stopped.
    ForRestart,
}

/// Runs a worker, starting it again (with backoff) if it panics, until it is stopped.
async fn keep_running(
    config: Arc<WorkerConfig>,
    origin: String,
    poll_interval: watch::Receiver<Duration>,
    stats: Arc<WorkerStats>,
    stop: StopSignal,
    after: Option<Stopped>,
) {
    if let Some(previous_stopped) = after {
        previous_stopped.wait().await;
        stop.predecessor_stopped();
    }
    let mut backoff = Backoff::default();
    loop {
        let worker = Worker::new(
            Arc::clone(&config),
            origin.clone(),
            poll_interval.clone(),
            Arc::clone(&stats),
            stop.clone(),
        );
        let started = tokio::time::Instant::now();
        // Caught here rather than in a separate task, so that aborting this task (at the
        // end of shutdown_timeout) drops the worker and its connections with it.
        if AssertUnwindSafe(worker.run()).catch_unwind().await.is_ok() {
            return;
        }
        if started.elapsed() >= PANIC_BACKOFF_RESET {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::error!(queue = %config.queue, retry_in = ?delay, "worker panicked; restarting it");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.requested() => return,
        }
    }
}

/// Waits for a stopping worker, aborting it after `timeout`.
async fn stop_within(queue: &str, mut handle: JoinHandle<()>, timeout: Duration) {
    if tokio::time::timeout(timeout, &mut handle).await.is_err() {
        tracing::warn!(
            queue = %queue,
            ?timeout,
            "worker did not finish its batch within shutdown_timeout; leaving the batch open to be relayed again"
        );
        handle.abort();
        let _ = handle.await;
    }
}

//! One worker per configured queue: starting them, restarting one that panicked,
//! applying a reloaded configuration, and the ordered shutdown.
//!
//! Workers are independent tasks; the supervisor never waits on one to serve another.
//! On reload, workers whose settings did not change are left untouched; removed ones are
//! stopped gracefully; changed ones are stopped gracefully and started again.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WorkerConfig};
use crate::stats::WorkerStats;
use crate::worker::Worker;

/// A running worker.
struct RunningWorker {
    /// The settings it runs with (compared on reload).
    config: Arc<WorkerConfig>,
    /// Cancelled to ask it to stop between batches.
    stop: CancellationToken,
    /// The task running it (and restarting it after a panic).
    handle: JoinHandle<()>,
    /// What it reports.
    stats: Arc<WorkerStats>,
}

/// The set of running workers.
pub struct Supervisor {
    workers: BTreeMap<String, RunningWorker>,
    /// Value of the `origin` header for every worker.
    origin: String,
    poll_interval: Duration,
    /// Workers being stopped after a reload, awaited at shutdown.
    retiring: Vec<JoinHandle<()>>,
}

/// Delay before restarting a worker whose task panicked.
const PANIC_RESTART_DELAY: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Starts a worker for every queue in `config`.
    pub fn start(config: &Config, origin: String) -> Supervisor {
        let mut supervisor = Supervisor {
            workers: BTreeMap::new(),
            origin,
            poll_interval: config.application.poll_interval,
            retiring: Vec::new(),
        };
        for worker in config.application.workers.values() {
            supervisor.spawn(Arc::new(worker.clone()));
        }
        if supervisor.workers.is_empty() {
            tracing::warn!("no workers configured (Application.workers is empty); nothing to relay");
        }
        supervisor
    }

    fn spawn(&mut self, config: Arc<WorkerConfig>) {
        let stop = CancellationToken::new();
        let stats = WorkerStats::new(&config.queue);
        let handle = tokio::spawn(keep_running(
            Arc::clone(&config),
            self.origin.clone(),
            self.poll_interval,
            Arc::clone(&stats),
            stop.clone(),
        ));
        tracing::info!(queue = %config.queue, "worker started");
        self.workers.insert(
            config.queue.clone(),
            RunningWorker {
                config,
                stop,
                handle,
                stats,
            },
        );
    }

    /// The stats of every running worker, by queue.
    pub fn stats(&self) -> Vec<Arc<WorkerStats>> {
        self.workers
            .values()
            .map(|worker| Arc::clone(&worker.stats))
            .collect()
    }

    /// Applies a reloaded configuration: new queues start, removed ones stop, changed
    /// ones restart, the rest are untouched.
    pub fn apply(&mut self, config: &Config) {
        self.poll_interval = config.application.poll_interval;
        let wanted = &config.application.workers;
        let removed: Vec<String> = self
            .workers
            .keys()
            .filter(|queue| !wanted.contains_key(*queue))
            .cloned()
            .collect();
        for queue in removed {
            tracing::info!(queue = %queue, "queue removed from the configuration; stopping its worker");
            self.retire(&queue);
        }
        for (queue, settings) in wanted {
            match self.workers.get(queue) {
                Some(running) if *running.config == *settings => {}
                Some(_) => {
                    tracing::info!(queue = %queue, "worker settings changed; restarting it");
                    self.retire(queue);
                    self.spawn(Arc::new(settings.clone()));
                }
                None => self.spawn(Arc::new(settings.clone())),
            }
        }
    }

    /// Asks a worker to stop and lets it finish in the background.
    fn retire(&mut self, queue: &str) {
        if let Some(worker) = self.workers.remove(queue) {
            worker.stop.cancel();
            self.retiring.push(tokio::spawn(stop_within(
                worker.config.queue.clone(),
                worker.handle,
                worker.config.shutdown_timeout,
            )));
        }
    }

    /// Stops every worker: each settles and finishes its open batch within its
    /// `shutdown_timeout`, or is aborted with the batch left open for later.
    pub async fn shutdown(mut self) {
        let queues: Vec<String> = self.workers.keys().cloned().collect();
        for queue in queues {
            self.retire(&queue);
        }
        for retiring in self.retiring.drain(..) {
            let _ = retiring.await;
        }
    }
}

/// Runs a worker, starting it again if its task panics, until it is stopped.
async fn keep_running(
    config: Arc<WorkerConfig>,
    origin: String,
    poll_interval: Duration,
    stats: Arc<WorkerStats>,
    stop: CancellationToken,
) {
    loop {
        let worker = Worker::new(
            Arc::clone(&config),
            origin.clone(),
            poll_interval,
            Arc::clone(&stats),
            stop.clone(),
        );
        // Caught here rather than in a separate task, so that aborting this task (at the
        // end of shutdown_timeout) drops the worker and its connections with it.
        match AssertUnwindSafe(worker.run()).catch_unwind().await {
            Ok(()) => return,
            Err(_) => tracing::error!(queue = %config.queue, "worker panicked; restarting it"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PANIC_RESTART_DELAY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Waits for a stopping worker, aborting it after `timeout`.
async fn stop_within(queue: String, mut handle: JoinHandle<()>, timeout: Duration) {
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

//! Relaying one batch: read its events in chunks, publish them in `ev_id` order with up
//! to `max_in_flight` unconfirmed, settle each one, then finish the batch.
//!
//! When the broker closes the channel (an exchange that does not exist, a permission
//! refused) the culprit is not known: every unconfirmed event is a suspect. A new channel
//! is opened and the suspects are published again one at a time, waiting for each
//! confirm, so the one that closes the channel again is the one that fails; the others
//! are confirmed (some of them a second time, with the same `message_id`). Then
//! pipelining resumes for the rest of the batch. The worker never stalls on a bad event.
//!
//! This needs publisher confirms: with `confirm: false` the broker says nothing per
//! message, so neither an unroutable message nor the one that closed the channel can be
//! told apart (the configuration warns about it).

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use lapin::PublisherConfirm;

use super::progress::BatchProgress;
use super::settle::Settlement;
use crate::amqp::{Broker, Outcome};
use crate::audit;
use crate::config::WorkerConfig;
use crate::error::{Link, WorkerError};
use crate::event::Event;
use crate::mapping::{self, Message, MessageDefaults};
use crate::pgq::{Batch, BatchTransaction, PgqSession};
use crate::stats::WorkerStats;

/// At most this many distinct ignored `ev_extra3` keys are remembered for logging once.
const IGNORED_KEYS_REMEMBERED: usize = 1000;

/// Most publishes handed to lapin before their sends are awaited together.
const PUBLISH_GROUP: usize = 256;

/// Polls every future in `futures` in index order until all are done, and returns their
/// outputs in that order. The first poll of each happens in order, which for
/// `basic_publish` is when its frames are queued.
async fn sent_in_order<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|context| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// A published message waiting for its confirm.
struct InFlight {
    event: Event,
    confirm: PublisherConfirm,
    /// When it was handed to lapin, for the confirm-latency histogram.
    sent_at: Instant,
    /// The broker's answer and how long it took, once seen (a confirm future cannot be
    /// polled again after it completed).
    outcome: Option<(Outcome, Duration)>,
}

impl InFlight {
    /// The broker's answer (see [`Broker::answer`] for the deadline).
    async fn wait(&mut self, broker: &Broker, deadline: Duration) -> (Outcome, Duration) {
        // Most answers are in by the time they are asked for: no timer for those.
        if self.is_settled()
            && let Some(answer) = &self.outcome
        {
            return answer.clone();
        }
        let answer = (
            broker.answer(&mut self.confirm, deadline).await,
            self.sent_at.elapsed(),
        );
        self.outcome = Some(answer.clone());
        answer
    }

    /// True when the answer is in (without waiting).
    fn is_settled(&mut self) -> bool {
        if self.outcome.is_none()
            && let Some(result) = (&mut self.confirm).now_or_never()
        {
            self.outcome = Some((Outcome::from_result(result), self.sent_at.elapsed()));
        }
        self.outcome.is_some()
    }
}

/// Everything relaying a batch needs from its worker.
pub(super) struct BatchRelay<'a> {
    pub config: &'a WorkerConfig,
    pub defaults: &'a MessageDefaults,
    pub stats: &'a WorkerStats,
    pub broker: &'a mut Broker,
    pub progress: &'a mut BatchProgress,
    pub ignored_keys: &'a mut HashSet<String>,
}

/// Counts of one relayed batch, for the debug log line.
#[derive(Debug, Default)]
pub(super) struct BatchSummary {
    /// Events in the batch.
    pub events: u64,
    /// Events handed to the publisher (the others were rejected or already confirmed).
    pub to_publish: u64,
    /// Events confirmed in an earlier attempt at this batch, skipped.
    pub already_confirmed: u64,
}

impl BatchRelay<'_> {
    /// Relays `batch` and finishes it.
    pub async fn relay(
        mut self,
        session: &mut PgqSession,
        batch: &Batch,
    ) -> Result<BatchSummary, WorkerError> {
        let started = Instant::now();
        self.progress.start(batch.id);
        let mut transaction = session.open_batch(batch, self.config.fetch_size).await?;
        let mut window = Window::default();
        let mut settlement = Settlement::new(self.defaults.message_ids);
        let mut summary = BatchSummary::default();
        let published = self
            .publish_all(&mut transaction, &mut window, &mut settlement, &mut summary)
            .await;
        if let Err(error) = published {
            if error.broken_link() == Link::Postgres {
                // The batch will be read again on a new session. What is already on its
                // way to the broker is waited for, so the confirmed part is not
                // published twice; anything else is decided again then.
                self.record_confirms(&mut window).await;
            }
            return Err(error);
        }
        self.drain(&mut window, &mut settlement).await?;
        self.finish(transaction, settlement, started, summary.events)
            .await?;
        Ok(summary)
    }

    /// Reads the batch chunk by chunk and publishes every event not yet confirmed.
    async fn publish_all(
        &mut self,
        transaction: &mut BatchTransaction<'_>,
        window: &mut Window,
        settlement: &mut Settlement,
        summary: &mut BatchSummary,
    ) -> Result<(), WorkerError> {
        loop {
            let chunk = transaction.next_chunk().await?;
            if chunk.is_empty() {
                return Ok(());
            }
            summary.events += chunk.len() as u64;
            let mut ready = Vec::with_capacity(chunk.len());
            for event in chunk {
                if self.progress.is_confirmed(event.ev_id) {
                    summary.already_confirmed += 1;
                    continue;
                }
                match mapping::build_message(&event, self.defaults) {
                    Ok(mapped) => {
                        self.note_ignored_keys(&event, mapped.ignored_properties);
                        ready.push((event, mapped.message));
                    }
                    Err(rejection) => settlement.rejected(&self.config.queue, event, rejection.to_string()),
                }
            }
            summary.to_publish += ready.len() as u64;
            self.publish_in_order(ready, transaction, window, settlement)
                .await?;
            if settlement.should_flush() {
                self.drain(window, settlement).await?;
                settlement.flush(self.config, transaction, self.broker).await?;
            }
        }
    }

    async fn finish(
        &mut self,
        transaction: BatchTransaction<'_>,
        mut settlement: Settlement,
        started: Instant,
        events: u64,
    ) -> Result<(), WorkerError> {
        settlement.flush(self.config, &transaction, self.broker).await?;
        if self.config.audit {
            audit::mark_confirmed(
                transaction.transaction(),
                &self.config.queue,
                self.progress.confirmed_ids(),
            )
            .await?;
        }
        transaction.finish().await?;
        self.progress.finished();
        settlement.totals.record(self.stats);
        self.stats.batches.add(1);
        self.stats.batch_size.observe(events as f64);
        self.stats.batch_duration.observe_duration(started.elapsed());
        tracing::debug!(queue = %self.config.queue, elapsed = ?started.elapsed(), "batch finished");
        Ok(())
    }

    /// Publishes `ready` in order, keeping at most `max_in_flight` unconfirmed.
    ///
    /// Messages go out in groups: every publish of a group hands its frames to lapin
    /// before any is awaited, so the connection's I/O thread is woken once per group
    /// rather than once per message (the wake-ups, not the bytes, were the relay's main
    /// CPU cost). Frames are queued in the order the publishes are first polled, which
    /// [`sent_in_order`] makes the group's order.
    async fn publish_in_order(
        &mut self,
        ready: Vec<(Event, Message)>,
        transaction: &BatchTransaction<'_>,
        window: &mut Window,
        settlement: &mut Settlement,
    ) -> Result<(), WorkerError> {
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            if window.len() >= self.config.max_in_flight {
                self.make_room(window, settlement).await?;
                continue;
            }
            // Without the session, the exclusive lock may be gone and a standby may be
            // taking over this batch: stop publishing at once.
            if transaction.is_closed() {
                return Err(WorkerError::Postgres(crate::pgq::PgqError::SessionLost));
            }
            self.broker.wait_unblocked().await;
            let room = (self.config.max_in_flight - window.len()).min(PUBLISH_GROUP);
            let (events, messages): (Vec<Event>, Vec<Message>) = ready.by_ref().take(room).unzip();
            let broker = &*self.broker;
            let mandatory = self.config.mandatory;
            let sends = events
                .iter()
                .zip(messages)
                .map(|(event, message)| broker.publish(message, event.body(), mandatory));
            let sent_at = Instant::now();
            let results = sent_in_order(sends.collect()).await;
            let mut group = events.into_iter();
            for result in results {
                let Some(event) = group.next() else { break };
                match result {
                    Ok(confirm) => window.push(InFlight {
                        event,
                        confirm,
                        sent_at,
                        outcome: None,
                    }),
                    Err(error) => {
                        // The channel refused the message outright: an earlier publish
                        // closed it, or the connection is gone. This event, the rest of
                        // its group and everything unconfirmed are suspects; the rest of
                        // the chunk goes on pipelined afterwards.
                        let reason = channel_failure(Outcome::from_error(&error))?;
                        let mut suspects = window.take_events();
                        suspects.push(event);
                        suspects.extend(group.by_ref());
                        self.after_channel_failure(reason, suspects, settlement).await?;
                        break;
                    }
                }
            }
            self.stats.set_in_flight(window.len());
        }
        Ok(())
    }

    /// Makes room in a full window. Waits for the confirm a quarter of the way in (the
    /// broker usually confirms in order, so the ones before it are mostly in too), then
    /// settles every confirm that has arrived from the oldest on: one wake-up per quarter
    /// window instead of one per message, and room for a whole publish group afterwards.
    async fn make_room(
        &mut self,
        window: &mut Window,
        settlement: &mut Settlement,
    ) -> Result<(), WorkerError> {
        let quarter = (self.config.max_in_flight / 4).clamp(1, window.len().max(1));
        if let Some(flight) = window.flights.get_mut(quarter - 1) {
            let (outcome, _) = flight.wait(self.broker, self.config.confirm_timeout).await;
            if let Outcome::ConnectionLost { reason } = outcome {
                // No need to wait out the deadline once more for the oldest.
                return Err(WorkerError::BrokerLost { reason });
            }
        }
        self.settle_oldest(window, settlement).await?;
        while window.front_is_settled() {
            self.settle_oldest(window, settlement).await?;
        }
        Ok(())
    }

    /// Waits for the oldest unconfirmed message and settles it.
    async fn settle_oldest(
        &mut self,
        window: &mut Window,
        settlement: &mut Settlement,
    ) -> Result<(), WorkerError> {
        let Some(mut flight) = window.pop() else {
            return Ok(());
        };
        let (outcome, latency) = flight.wait(self.broker, self.config.confirm_timeout).await;
        self.stats.set_in_flight(window.len());
        if outcome == Outcome::Acked {
            self.stats.confirm_latency.observe_duration(latency);
        }
        match outcome {
            Outcome::ChannelClosed { .. } | Outcome::ConnectionLost { .. } => {
                let reason = channel_failure(outcome)?;
                let mut suspects = vec![flight.event];
                suspects.extend(window.take_events());
                self.after_channel_failure(reason, suspects, settlement).await
            }
            settled => {
                self.settle(flight.event, settled, settlement);
                Ok(())
            }
        }
    }

    /// Settles every unconfirmed message.
    async fn drain(&mut self, window: &mut Window, settlement: &mut Settlement) -> Result<(), WorkerError> {
        while !window.is_empty() {
            self.settle_oldest(window, settlement).await?;
        }
        Ok(())
    }

    /// After losing the PostgreSQL session: notes the confirms already on their way, and
    /// nothing else. Nothing is published again here, since without the session the
    /// queue's lock may already belong to a standby.
    async fn record_confirms(&mut self, window: &mut Window) {
        while let Some(mut flight) = window.pop() {
            match flight.wait(self.broker, self.config.confirm_timeout).await.0 {
                Outcome::Acked => {
                    self.progress.confirmed(flight.event.ev_id);
                    self.stats.processed.add(1);
                }
                Outcome::ChannelClosed { .. } | Outcome::ConnectionLost { .. } => break,
                Outcome::Nacked | Outcome::Returned { .. } => {}
            }
        }
        self.stats.set_in_flight(0);
    }

    /// Records an ack, nack or return for `event`.
    fn settle(&mut self, event: Event, outcome: Outcome, settlement: &mut Settlement) {
        match outcome {
            Outcome::Acked => {
                self.progress.confirmed(event.ev_id);
                self.stats.processed.add(1);
                self.stats.progressed();
            }
            Outcome::Nacked => {
                self.stats.failed.add(1);
                self.stats.nacked.add(1);
                settlement.failed(
                    &self.config.queue,
                    event,
                    "NACK: the broker refused the message".to_owned(),
                );
            }
            Outcome::Returned {
                reply_code,
                reply_text,
            } => {
                self.stats.failed.add(1);
                self.stats.returned.add(1);
                let reason = format!(
                    "{reply_text} (reply code {reply_code}): the broker could not route the message \
                     (exchange {:?}, routing key {:?})",
                    event.ev_extra1.as_deref().unwrap_or(""),
                    event.ev_type.as_deref().unwrap_or("")
                );
                settlement.failed(&self.config.queue, event, reason);
            }
            Outcome::ChannelClosed { reason } | Outcome::ConnectionLost { reason } => {
                self.stats.failed.add(1);
                settlement.failed(&self.config.queue, event, reason);
            }
        }
    }

    /// The broker closed the channel (`reason`) with `suspects` unconfirmed, in `ev_id`
    /// order: publishes them again one at a time on a new channel.
    async fn after_channel_failure(
        &mut self,
        reason: String,
        suspects: Vec<Event>,
        settlement: &mut Settlement,
    ) -> Result<(), WorkerError> {
        self.stats.set_in_flight(0);
        tracing::warn!(
            queue = %self.config.queue,
            %reason,
            unconfirmed = suspects.len(),
            "rabbitmq closed the channel; publishing the unconfirmed events again one at a time"
        );
        self.broker.reopen_channel().await?;
        for event in suspects {
            self.publish_alone(event, settlement).await?;
        }
        Ok(())
    }

    /// Publishes one suspect and waits for its answer; a channel it closes is its fault.
    async fn publish_alone(&mut self, event: Event, settlement: &mut Settlement) -> Result<(), WorkerError> {
        let message = match mapping::build_message(&event, self.defaults) {
            Ok(mapped) => mapped.message,
            Err(rejection) => {
                settlement.rejected(&self.config.queue, event, rejection.to_string());
                return Ok(());
            }
        };
        let outcome = self
            .broker
            .publish_and_wait(
                message,
                event.body(),
                self.config.mandatory,
                self.config.confirm_timeout,
            )
            .await;
        match outcome {
            Outcome::ConnectionLost { reason } => Err(WorkerError::BrokerLost { reason }),
            Outcome::ChannelClosed { .. } => {
                self.settle(event, outcome, settlement);
                self.broker.reopen_channel().await?;
                Ok(())
            }
            settled => {
                self.settle(event, settled, settlement);
                Ok(())
            }
        }
    }

    fn note_ignored_keys(&mut self, event: &Event, keys: Vec<String>) {
        for key in keys {
            if self.ignored_keys.len() < IGNORED_KEYS_REMEMBERED && self.ignored_keys.insert(key.clone()) {
                tracing::warn!(
                    queue = %self.config.queue,
                    ev_id = event.ev_id,
                    key = %key,
                    "ev_extra3 key is not an AMQP property; ignored (logged once per key)"
                );
            }
        }
    }
}

/// The broker's reason for closing the channel; a lost connection is an error instead
/// (everything unconfirmed is published again on the next connection).
fn channel_failure(outcome: Outcome) -> Result<String, WorkerError> {
    match outcome {
        Outcome::ChannelClosed { reason } => Ok(reason),
        Outcome::ConnectionLost { reason } => Err(WorkerError::BrokerLost { reason }),
        settled => Err(WorkerError::BrokerLost {
            reason: format!("unexpected broker answer {settled:?} for a failed channel"),
        }),
    }
}

/// Unconfirmed messages, oldest first.
#[derive(Default)]
struct Window {
    flights: VecDeque<InFlight>,
}

impl Window {
    fn len(&self) -> usize {
        self.flights.len()
    }

    fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    fn push(&mut self, flight: InFlight) {
        self.flights.push_back(flight);
    }

    fn pop(&mut self) -> Option<InFlight> {
        self.flights.pop_front()
    }

    /// True when the oldest message's answer is already in.
    fn front_is_settled(&mut self) -> bool {
        self.flights.front_mut().is_some_and(InFlight::is_settled)
    }

    /// Empties the window, dropping the confirm futures (their channel is gone).
    fn take_events(&mut self) -> Vec<Event> {
        self.flights.drain(..).map(|flight| flight.event).collect()
    }
}

//! The drive loop: runs a [`Node`] against real ports. Written once, used by the daemon and
//! by the simulation, so both exercise the same sequencing.
//!
//! Storage calls run synchronously through [`Env::blocking`]; transport calls run as
//! futures, many at once (publishes are pipelined), and their results come back as inputs.
//! Sources are polled in a fixed priority order (control, finished operations,
//! deliveries, local-change hints, the timer), so a simulation replays exactly.

use crate::apply::Delivery;
use crate::node::{Event, Input, Node, Output, Status, Stop, Timer};
use crate::ports::{
    Deliveries, Env, Snapshots, Storage, StorageError, StorageOp, StreamBounds, Transport,
    TransportError,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// Receives what the node reports.
pub trait Observer {
    /// An event happened at monotonic time `now`.
    fn event(&mut self, now: Duration, event: &Event);
    /// The node's status after a round of work.
    fn status(&mut self, _status: &Status) {}
    /// The node woke at monotonic time `now` because `timer` was due.
    fn timer(&mut self, _now: Duration, _timer: Timer) {}
}

/// Requests from outside the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Publish what is pending and stop.
    Shutdown,
}

// One per completed operation, moved once: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Done {
    Input(Input),
    Subscribed(u64, Result<(StreamBounds, Deliveries), TransportError>),
}

/// Most deliveries handed to the node in one input.
const DELIVERY_BURST: usize = 1024;

/// Runs the node until it stops. `wake` yields a hint whenever the database may have
/// changed; `control` carries shutdown requests. The node must be fresh (not recovered).
#[allow(clippy::too_many_arguments)]
pub async fn run<S, T, P, E, O>(
    node: &mut Node,
    storage: &mut S,
    transport: Arc<T>,
    snapshots: Arc<P>,
    env: &E,
    observer: &mut O,
    mut wake: Pin<&mut (dyn Stream<Item = ()> + Send)>,
    mut control: Pin<&mut (dyn Stream<Item = Control> + Send)>,
) -> Stop
where
    S: Storage,
    T: Transport,
    P: Snapshots + ?Sized,
    E: Env + Clone + Send + Sync + 'static,
    O: Observer,
{
    let mut ops: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
    // The current subscription's stream, with its generation, and the newest generation
    // asked for (a slower, older subscribe that completes later is dropped).
    let mut deliveries: Option<(u64, Deliveries)> = None;
    let mut wanted_generation = 0u64;
    let mut control_open = true;
    let mut wake_open = true;

    // Without its persisted state the node cannot run at all. A failure to read it (an
    // application holding the write lock, a disk that failed for a moment) is retried, with
    // backoff, until it works or a shutdown is asked for: nothing was touched meanwhile.
    let mut retry_in = Duration::from_millis(100);
    loop {
        let recovered = env.blocking(|| storage.recover());
        match recovered {
            Ok(mut r) => {
                r.wall_ms = env.wall_ms();
                node.handle(env.now(), Input::Recovered(r));
                break;
            }
            Err(e) => {
                observer.event(
                    env.now(),
                    &Event::StorageFailed {
                        error: StorageError::new(StorageOp::Recover, &e),
                        retry_in,
                    },
                );
                let deadline = env.now() + retry_in;
                retry_in = (retry_in * 2).min(Duration::from_secs(5));
                let mut sleep = env.sleep_until(deadline);
                loop {
                    if !control_open {
                        (&mut sleep).await;
                        break;
                    }
                    match futures::future::select(control.next(), &mut sleep).await {
                        futures::future::Either::Left((Some(Control::Shutdown), _)) => {
                            return Stop::Shutdown { unpublished: 0 };
                        }
                        futures::future::Either::Left((None, _)) => control_open = false,
                        futures::future::Either::Right(_) => break,
                    }
                }
            }
        }
    }

    loop {
        while let Some(out) = node.poll_output() {
            match out {
                Output::Capture => {
                    let wall = node.stamp_time(env.now(), env.wall_ms());
                    let r = env.blocking(|| storage.capture(node.clock_mut(), wall));
                    node.handle(
                        env.now(),
                        Input::Captured(r.map_err(|e| StorageError::new(StorageOp::Capture, &e))),
                    );
                }
                Output::Prepare => {
                    let t = transport.clone();
                    ops.push(
                        async move { Done::Input(Input::Prepared(t.prepare().await)) }.boxed(),
                    );
                }
                Output::Claim => {
                    let t = transport.clone();
                    let env2 = env.clone();
                    let id = node.config().node_id;
                    let owner = node.config().owner.clone();
                    ops.push(
                        async move {
                            let sent_wall_ms = env2.wall_ms();
                            let result = t.claim(id, &owner).await;
                            Done::Input(Input::Claimed {
                                result,
                                sent_wall_ms,
                                received_wall_ms: env2.wall_ms(),
                            })
                        }
                        .boxed(),
                    );
                }
                Output::Subscribe {
                    from_seq,
                    generation,
                } => {
                    deliveries = None;
                    wanted_generation = generation;
                    let t = transport.clone();
                    ops.push(
                        async move { Done::Subscribed(generation, t.subscribe(from_seq).await) }
                            .boxed(),
                    );
                }
                Output::Unsubscribe { generation } => {
                    if deliveries.as_ref().is_some_and(|(g, _)| *g == generation) {
                        deliveries = None;
                    }
                }
                Output::Publish {
                    batch,
                    chunk,
                    payload,
                } => {
                    let payload = match payload {
                        Some(p) => Ok(Some(p)),
                        None => env.blocking(|| read_outbox(storage, batch, chunk)),
                    };
                    match payload {
                        Ok(Some(payload)) => {
                            let t = transport.clone();
                            ops.push(
                                async move {
                                    let result = t.publish(batch.message_id(chunk), payload).await;
                                    Done::Input(Input::Published {
                                        batch,
                                        chunk,
                                        result,
                                    })
                                }
                                .boxed(),
                            );
                        }
                        // Gone from the outbox: it was acknowledged already.
                        Ok(None) => node.handle(
                            env.now(),
                            Input::Published {
                                batch,
                                chunk,
                                result: Ok(0),
                            },
                        ),
                        Err(e) => node.handle(
                            env.now(),
                            Input::Published {
                                batch,
                                chunk,
                                result: Err(e),
                            },
                        ),
                    }
                }
                Output::Apply(ds) => {
                    let wall = node.stamp_time(env.now(), env.wall_ms());
                    let r = env.blocking(|| storage.apply(node.clock_mut(), wall, &ds));
                    let wall_ms = env.wall_ms();
                    node.handle(
                        env.now(),
                        Input::Applied {
                            result: r.map_err(|e| StorageError::new(StorageOp::Apply, &e)),
                            deliveries: ds,
                            wall_ms,
                        },
                    );
                }
                Output::MarkPublished(batch) => {
                    let r = env.blocking(|| storage.mark_published(batch));
                    node.handle(
                        env.now(),
                        Input::MarkedPublished(
                            r.map_err(|e| StorageError::new(StorageOp::MarkPublished, &e)),
                        ),
                    );
                }
                Output::RetryParked { all } => {
                    let wall = node.stamp_time(env.now(), env.wall_ms());
                    let r = env.blocking(|| storage.retry_parked(node.clock_mut(), wall, all));
                    node.handle(
                        env.now(),
                        Input::ParkedRetried(
                            r.map_err(|e| StorageError::new(StorageOp::RetryParked, &e)),
                        ),
                    );
                }
                Output::SaveSnapshot { position, seed } => {
                    let p = snapshots.clone();
                    let kind = if seed {
                        crate::snapshot::SaveKind::Seed
                    } else {
                        crate::snapshot::SaveKind::Due
                    };
                    ops.push(
                        async move {
                            let r = p.save(position, kind).await.map_err(|e| e.to_string());
                            Done::Input(Input::SnapshotSaved(r))
                        }
                        .boxed(),
                    );
                }
                Output::FetchSnapshot { min_position } => {
                    let p = snapshots.clone();
                    ops.push(
                        async move {
                            Done::Input(Input::SnapshotFetched(
                                p.fetch(min_position).await.map_err(|e| e.to_string()),
                            ))
                        }
                        .boxed(),
                    );
                }
                Output::RestoreSnapshot(staged) => {
                    let wall = node.stamp_time(env.now(), env.wall_ms());
                    let r = env.blocking(|| storage.restore(node.clock_mut(), wall, &staged));
                    node.handle(
                        env.now(),
                        Input::Restored(r.map_err(|e| StorageError::new(StorageOp::Restore, &e))),
                    );
                }
                Output::Event(e) => observer.event(env.now(), &e),
                Output::Stop(s) => {
                    observer.status(&node.status());
                    return s;
                }
            }
        }
        observer.status(&node.status());

        let (deadline, timer) = node.poll_timer();
        let mut sleep = env.sleep_until(deadline);
        let wants = node.wants_deliveries();
        let input = futures::future::poll_fn(|cx| {
            if control_open {
                match control.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Control::Shutdown)) => return Poll::Ready(Input::Shutdown),
                    Poll::Ready(None) => control_open = false,
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(Some(done)) = ops.poll_next_unpin(cx) {
                return Poll::Ready(match done {
                    Done::Input(i) => i,
                    Done::Subscribed(generation, Ok((bounds, stream))) => {
                        if generation == wanted_generation {
                            deliveries = Some((generation, stream));
                        }
                        Input::Subscribed {
                            generation,
                            result: Ok(bounds),
                        }
                    }
                    Done::Subscribed(generation, Err(e)) => Input::Subscribed {
                        generation,
                        result: Err(e),
                    },
                });
            }
            if wants && let Some((generation, stream)) = deliveries.as_mut() {
                let generation = *generation;
                match stream.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(first))) => {
                        let mut burst: Vec<Delivery> = vec![first];
                        let mut ended = None;
                        while burst.len() < DELIVERY_BURST {
                            match stream.poll_next_unpin(cx) {
                                Poll::Ready(Some(Ok(d))) => burst.push(d),
                                Poll::Ready(Some(Err(e))) => {
                                    ended = Some(Some(e));
                                    break;
                                }
                                Poll::Ready(None) => {
                                    ended = Some(None);
                                    break;
                                }
                                Poll::Pending => break,
                            }
                        }
                        if let Some(error) = ended {
                            deliveries = None;
                            // Deliver what arrived, then report the end on the next round.
                            let end = Input::SubscriptionEnded { generation, error };
                            ops.push(futures::future::ready(Done::Input(end)).boxed());
                        }
                        return Poll::Ready(Input::Delivered {
                            generation,
                            deliveries: burst,
                        });
                    }
                    Poll::Ready(Some(Err(e))) => {
                        deliveries = None;
                        return Poll::Ready(Input::SubscriptionEnded {
                            generation,
                            error: Some(e),
                        });
                    }
                    Poll::Ready(None) => {
                        deliveries = None;
                        return Poll::Ready(Input::SubscriptionEnded {
                            generation,
                            error: None,
                        });
                    }
                    Poll::Pending => {}
                }
            }
            if wake_open {
                let mut woke = false;
                loop {
                    match wake.as_mut().poll_next(cx) {
                        Poll::Ready(Some(())) => woke = true,
                        Poll::Ready(None) => {
                            wake_open = false;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                if woke {
                    return Poll::Ready(Input::LocalChange);
                }
            }
            if sleep.poll_unpin(cx).is_ready() {
                return Poll::Ready(Input::Tick);
            }
            Poll::Pending
        })
        .await;
        if let Input::Tick = input {
            observer.timer(env.now(), timer);
        }
        node.handle(env.now(), input);
    }
}

/// Reads a message of the outbox for [`Output::Publish`] when the node no longer holds it in
/// memory. `None`: it left the outbox, so it was acknowledged already. A failed read is a
/// failed publish (retried with the same backoff).
pub(crate) fn read_outbox<S: Storage>(
    storage: &mut S,
    batch: crate::wire::BatchId,
    chunk: u32,
) -> Result<Option<bytes::Bytes>, TransportError> {
    storage
        .outbox_message(batch, chunk)
        .map_err(|e| TransportError::other(format!("reading the outbox: {e}")))
}

//! How many `@connections` calls one processor keeps in flight: an adaptive limit shared by every
//! record and every room the process is working on.
//!
//! Fan-out is bound by latency: calls a second = calls in flight / latency. From a Lambda in its
//! region a call takes tens of milliseconds, so the account's default quota of 10,000 calls a
//! second needs about 200 in flight at 20 ms and 500 at 50 ms. A fixed number is either too few
//! (the quota is never reached) or too many (every call past the quota answers 429 and is sent
//! again). The limit therefore adapts, as TCP's congestion window does (AIMD):
//!
//! * **Slow start.** From `initial`, the limit grows by one for every call that succeeds while
//!   the window is in use and latency holds: it doubles every round trip, up to `max`.
//! * **Throttled.** A 429 on a *fresh* call (below) while at least [`CUT_SHARE`] of the last
//!   second's fresh calls were throttled cuts it to 0.7× of what was really in use, never below
//!   one, and ends slow start; calls already in flight when it was cut do not cut it again.
//!   From then on it grows by one per round trip (1/limit per success).
//! * **Latency does not hold.** A call that took more than twice the best recent latency plus
//!   10 ms does not grow the limit: the endpoint, or this process, is saturated. 5xx answers
//!   and timeouts neither grow nor cut it.
//! * **Idle.** After [`IDLE_RESET`] without a call, it starts again from `initial`, in slow
//!   start: a container that reached its ceiling yesterday does not open today's burst with it.
//!
//! `max` is `ROOMCAST_DELIVERY_CONCURRENCY` (512 by default: a Lambda process has 1,024 file
//! descriptors, and every call in flight holds a connection).
//!
//! It also tells an account's throttling from slow clients. API Gateway answers both with
//! `429 LimitExceededException`: a client whose send buffer is full, and an account over its
//! quota. A call is *fresh* unless its connection already answered 429 [`STREAK`] times in a row:
//! a slow client soon stops being fresh, while an account's throttling keeps hitting fresh calls.
//! When at least [`ACCOUNT_SHARE`] of the last second's fresh calls (and at least three) were
//! throttled, the account is throttling ([`AdaptiveLimit::account_throttled`]): the deliverer
//! retries, and those 429s do not count against any connection's slow-consumer budget. So one
//! or a few slow clients neither shrink everyone's concurrency nor hide from being closed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// A connection that answered 429 this many times in a row makes no more fresh calls.
pub const STREAK: u32 = 3;
/// This share of the last second's fresh calls throttled: the account is throttling.
pub const ACCOUNT_SHARE: f64 = 0.2;
/// This share of the last second's fresh calls throttled: a fresh 429 cuts the limit.
pub const CUT_SHARE: f64 = 0.05;
/// No call for this long: the limit starts again from `initial`.
pub const IDLE_RESET: Duration = Duration::from_secs(10);
/// The window the shares are taken over, in buckets of 100 ms.
const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_millis(100);
/// What a cut keeps of the limit.
const CUT: f64 = 0.7;
/// Latency holds while a call takes at most twice the best recent latency plus this.
const LATENCY_SLACK: Duration = Duration::from_millis(10);
/// The best latency is taken over epochs this long, so that it follows a change of regime.
const BEST_EPOCH: Duration = Duration::from_secs(10);

pub struct AdaptiveLimit {
    semaphore: Semaphore,
    min: usize,
    initial: usize,
    max: usize,
    state: Mutex<State>,
}

struct State {
    limit: f64,
    /// Permits the semaphore is meant to hold (in use or free), net of `debt`.
    permits: usize,
    /// Permits to forget as they come back, after a cut that found too few free.
    debt: usize,
    slow_start: bool,
    /// The best latency of the previous epoch and of this one.
    best: Option<Duration>,
    best_now: Option<Duration>,
    epoch_started: Instant,
    last_cut: Option<Instant>,
    last_call: Instant,
    in_flight: usize,
    peak_in_flight: usize,
    /// The last second's fresh calls, in buckets of 100 ms: (bucket start, calls, throttled).
    fresh: VecDeque<(Instant, u32, u32)>,
}

/// How a call made under a [`Slot`] ended.
pub enum Finished {
    /// Answered 2xx, 410 or 413: its latency counts.
    Answered,
    /// 429.
    Throttled,
    /// No answer, a timeout or a 5xx: neither grows nor cuts.
    NoAnswer,
}

/// One call in flight. Dropping it without [`Slot::finish`] counts as [`Finished::NoAnswer`].
pub struct Slot<'a> {
    limit: &'a AdaptiveLimit,
    permit: Option<SemaphorePermit<'a>>,
    started: Instant,
    /// Its connection had answered fewer than [`STREAK`] 429s in a row.
    fresh: bool,
}

impl AdaptiveLimit {
    pub fn new(initial: usize, max: usize) -> AdaptiveLimit {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        let state = State {
            limit: initial as f64,
            permits: initial,
            debt: 0,
            slow_start: true,
            best: None,
            best_now: None,
            epoch_started: Instant::now(),
            last_cut: None,
            last_call: Instant::now(),
            in_flight: 0,
            peak_in_flight: 0,
            fresh: VecDeque::new(),
        };
        AdaptiveLimit { semaphore: Semaphore::new(initial), min: 1, initial, max, state: Mutex::new(state) }
    }

    /// Waits for room for one more call to a connection that has answered `streak` 429s in a row.
    pub async fn acquire(&self, streak: u32) -> Slot<'_> {
        {
            let mut state = self.lock();
            if state.in_flight == 0 && state.last_call.elapsed() >= IDLE_RESET && state.permits != self.initial {
                state.limit = self.initial as f64;
                state.slow_start = true;
                self.resize(&mut state, self.initial);
            }
        }
        let permit = self.semaphore.acquire().await.expect("the limit's semaphore is never closed");
        let mut state = self.lock();
        state.in_flight += 1;
        state.peak_in_flight = state.peak_in_flight.max(state.in_flight);
        state.last_call = Instant::now();
        Slot { limit: self, permit: Some(permit), started: Instant::now(), fresh: streak < STREAK }
    }

    /// The most calls allowed in flight now.
    pub fn current(&self) -> usize {
        self.lock().permits
    }

    /// The most calls that were in flight at once since the process started.
    pub fn peak_in_flight(&self) -> usize {
        self.lock().peak_in_flight
    }

    /// The ceiling the limit grows to.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether the account, not a client, is throttling: at least [`ACCOUNT_SHARE`] of the
    /// last second's fresh calls, and at least three, were answered 429.
    pub fn account_throttled(&self) -> bool {
        let (calls, throttled) = self.lock().fresh_share(Instant::now());
        throttled >= 3 && throttled as f64 >= calls as f64 * ACCOUNT_SHARE
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the semaphore hold `target` permits.
    fn resize(&self, state: &mut State, target: usize) {
        let target = target.clamp(self.min, self.max);
        if target > state.permits {
            let up = target - state.permits;
            let cancelled = up.min(state.debt);
            state.debt -= cancelled;
            self.semaphore.add_permits(up - cancelled);
        } else if target < state.permits {
            let down = state.permits - target;
            let forgotten = self.semaphore.forget_permits(down);
            state.debt += down - forgotten;
        }
        state.permits = target;
    }

    fn finished(&self, started: Instant, fresh: bool, how: Finished) {
        let now = Instant::now();
        let mut state = self.lock();
        if fresh && !matches!(how, Finished::NoAnswer) {
            state.count_fresh(now, matches!(how, Finished::Throttled));
        }
        match how {
            Finished::Answered => {
                let latency = now - started;
                if now - state.epoch_started >= BEST_EPOCH {
                    state.best = state.best_now.or(state.best);
                    state.best_now = None;
                    state.epoch_started = now;
                }
                state.best_now = Some(state.best_now.map_or(latency, |b| b.min(latency)));
                let best = state.best.map_or(latency, |b| b.min(latency));
                state.best = Some(best);
                let holds = latency <= best * 2 + LATENCY_SLACK;
                // Grow only a window in use: calls finishing with room to spare say nothing of
                // whether more would be served.
                let in_use = state.in_flight * 2 >= state.permits;
                if holds && in_use && state.permits < self.max {
                    state.limit += if state.slow_start { 1.0 } else { 1.0 / state.limit };
                    state.limit = state.limit.min(self.max as f64);
                    let target = state.limit as usize;
                    self.resize(&mut state, target);
                }
            }
            Finished::Throttled => {
                let (calls, throttled) = state.fresh_share(now);
                let shared = throttled as f64 >= calls as f64 * CUT_SHARE;
                // Calls already in flight when the limit was cut say nothing about the new limit.
                let after_cut = state.last_cut.is_none_or(|at| started > at);
                if fresh && shared && after_cut {
                    state.slow_start = false;
                    state.last_cut = Some(now);
                    // Of what was really in use: a limit grown past the demand cuts to something.
                    // (at least half the limit: one cut never takes more than 65% off).
                    let in_use = (state.in_flight as f64).max(state.limit / 2.0).min(state.limit);
                    state.limit = (in_use * CUT).max(self.min as f64);
                    let target = state.limit as usize;
                    self.resize(&mut state, target);
                }
            }
            Finished::NoAnswer => {}
        }
    }

    fn release(&self, permit: SemaphorePermit<'_>) {
        let mut state = self.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.debt > 0 {
            state.debt -= 1;
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

impl State {
    fn prune(&mut self, now: Instant) {
        while self.fresh.front().is_some_and(|(at, _, _)| now - *at >= BUCKET * BUCKETS as u32) {
            self.fresh.pop_front();
        }
    }

    fn count_fresh(&mut self, now: Instant, throttled: bool) {
        self.prune(now);
        match self.fresh.back_mut() {
            Some((at, calls, n)) if now - *at < BUCKET => {
                *calls += 1;
                *n += u32::from(throttled);
            }
            _ => self.fresh.push_back((now, 1, u32::from(throttled))),
        }
    }

    /// The last second's fresh calls, and how many of them were throttled.
    fn fresh_share(&mut self, now: Instant) -> (u32, u32) {
        self.prune(now);
        self.fresh.iter().fold((0, 0), |(c, t), (_, calls, n)| (c + calls, t + n))
    }
}

impl Slot<'_> {
    pub fn finish(mut self, how: Finished) {
        self.limit.finished(self.started, self.fresh, how);
        if let Some(permit) = self.permit.take() {
            self.limit.release(permit);
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.limit.release(permit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn with_demand_it_grows_to_the_max_and_no_further() {
        let limit = std::sync::Arc::new(AdaptiveLimit::new(4, 64));
        // More callers than the max, each making calls of 1 ms one after the other.
        let workers: Vec<_> = (0..100)
            .map(|_| {
                let limit = limit.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        let slot = limit.acquire(0).await;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        slot.finish(Finished::Answered);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
        assert_eq!(limit.current(), 64);
        assert_eq!(limit.peak_in_flight(), 64);
    }

    #[tokio::test]
    async fn an_idle_window_does_not_grow() {
        let limit = AdaptiveLimit::new(32, 512);
        for _ in 0..100 {
            limit.acquire(0).await.finish(Finished::Answered);
        }
        assert_eq!(limit.current(), 32, "one call at a time says nothing about 33");
    }

    #[tokio::test]
    async fn throttled_calls_in_flight_cut_it_once_from_what_was_in_use() {
        let limit = AdaptiveLimit::new(100, 512);
        let slots: Vec<_> = futures::future::join_all((0..60).map(|_| limit.acquire(0))).await;
        let mut slots = slots.into_iter();
        // Three 429s of calls that were all in flight together: one cut, of the 60 in use.
        for _ in 0..3 {
            slots.next().unwrap().finish(Finished::Throttled);
        }
        assert_eq!(limit.current(), 42);
        // The rest succeed: congestion avoidance grows by about one per window, not one per call.
        for slot in slots {
            slot.finish(Finished::Answered);
        }
        assert!((42..=44).contains(&limit.current()), "{}", limit.current());
        // A call made after the cut that is throttled again cuts again.
        limit.acquire(0).await.finish(Finished::Throttled);
        assert!(limit.current() < 42, "{}", limit.current());
    }

    #[tokio::test]
    async fn a_cut_below_the_calls_in_flight_takes_effect_as_they_come_back() {
        let limit = AdaptiveLimit::new(10, 512);
        let slots: Vec<_> = futures::future::join_all((0..10).map(|_| limit.acquire(0))).await;
        let mut slots = slots.into_iter();
        slots.next().unwrap().finish(Finished::Throttled);
        assert_eq!(limit.current(), 7);
        // Nine still out, seven allowed: the first two back are forgotten, the rest free again.
        for slot in slots {
            slot.finish(Finished::NoAnswer);
        }
        let held: Vec<_> = futures::future::join_all((0..7).map(|_| limit.acquire(0))).await;
        let eighth = tokio::time::timeout(Duration::from_millis(50), limit.acquire(0)).await;
        assert!(eighth.is_err(), "an eighth call got room under a limit of seven");
        drop(held);
    }

    #[tokio::test]
    async fn a_slow_clients_repeated_429s_neither_cut_nor_look_like_the_account() {
        let limit = AdaptiveLimit::new(10, 512);
        for _ in 0..40 {
            limit.acquire(0).await.finish(Finished::Answered);
        }
        // One client: its first 429s are fresh, the rest of its streak is not.
        for streak in 0..20 {
            limit.acquire(streak).await.finish(Finished::Throttled);
        }
        assert!(!limit.account_throttled(), "three fresh 429s in 43 fresh calls");
        assert_eq!(limit.current(), 3, "one cut, when fresh 429s passed 5%; none for the streak");
        // Many connections' first calls throttled: the account.
        for _ in 0..20 {
            limit.acquire(0).await.finish(Finished::Throttled);
        }
        assert!(limit.account_throttled());
    }

    #[tokio::test]
    async fn a_throttle_with_no_fresh_calls_is_not_the_accounts() {
        let limit = AdaptiveLimit::new(10, 512);
        for streak in 3..30 {
            limit.acquire(streak).await.finish(Finished::Throttled);
        }
        assert!(!limit.account_throttled());
        assert_eq!(limit.current(), 10, "no fresh call, no cut");
    }
}

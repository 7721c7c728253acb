//! One recipient's `PostToConnection`: an attempt, what its answer means (410 / 429 / 413 / 5xx),
//! backing off, slow consumers, and closing a connection.

use super::*;

/// One attempt's result, classified.
pub(super) enum Attempt {
    Ok,
    Gone,
    Retry(String),
    GiveUp(String),
}

/// A recipient's deadlines: no call runs past `limit`, none starts after `start_limit`.
pub(super) struct Deadlines {
    limit: Instant,
    start_limit: Instant,
}

/// 429s in a row held against a client, and since when (not while the account is throttling).
#[derive(Default)]
pub(super) struct Throttled {
    since: Option<Instant>,
    counted: u32,
}

/// How [`Inner::send`] ended.
pub(super) enum Sent {
    Done(Outcome),
    /// Still answering 429 after the slow-consumer budget: judged with the frame's other
    /// recipients ([`Deliverer::judge_slow`]).
    Slow,
    /// A young connection answered 410, and the caller asked to set such retries aside.
    Young,
}

impl Inner {
    /// Delivers to one recipient, retrying by the rules of the module docs, until its own
    /// deadline or the batch's: no attempt starts after `start_by`, and none runs past
    /// `finish_by`. With `set_aside_young`, a young connection's 410 returns [`Sent::Young`] at
    /// once instead of being retried here.
    pub(super) async fn send(
        self: Arc<Self>,
        to: &Recipient,
        body: Blob,
        start_by: Option<Instant>,
        finish_by: Option<Instant>,
        set_aside_young: bool,
    ) -> Result<Sent, StoreError> {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        let client = self.client(endpoint);
        // The recipient's own clocks start with its first call, not while it waits for room
        // behind a big room's other recipients; that wait is bounded by the batch's window only.
        let first = match start_by {
            None => Some(self.limit.acquire(0).await),
            Some(at) => tokio::time::timeout_at(at.into(), self.limit.acquire(0)).await.ok(),
        };
        let Some(first) = first else {
            let why = "the invocation's time ran out before a call could be made".to_string();
            tracing::warn!(connection_id = %to.connection_id, reason = %why, "recipient unfinished");
            return Ok(Sent::Done(Outcome::Unfinished(why)));
        };
        let mut slot = Some(first);
        let own_deadline = Instant::now() + self.settings.deadline;
        let limit = finish_by.map_or(own_deadline, |f| f.min(own_deadline));
        let window =
            Deadlines { limit, start_limit: start_by.map_or(own_deadline, |s| s.min(own_deadline)).min(limit) };
        let mut backoff = self.settings.initial_backoff;
        let mut throttled = Throttled::default();
        loop {
            let slot = match slot.take() {
                Some(slot) => Ok(slot),
                None => {
                    let streak = self.streak(&to.connection_id);
                    tokio::time::timeout_at(window.start_limit.into(), self.limit.acquire(streak)).await
                }
            };
            let attempt = match slot {
                Err(_) => Attempt::Retry("no room for another call in flight before the deadline".into()),
                Ok(slot) => self.attempt(&client, to, &body, slot, &window).await,
            };
            let why_retry = match self.judge(to, attempt, set_aside_young).await? {
                Ok(sent) => return Ok(sent),
                Err(why) => why,
            };
            if why_retry.starts_with("429") {
                if self.throttled_too_long(to, &mut throttled, window.limit).await {
                    return Ok(Sent::Slow);
                }
            } else {
                self.clear_streak(&to.connection_id);
                throttled = Throttled::default();
            }
            if Instant::now() + backoff > window.start_limit {
                return Ok(Sent::Done(self.out_of_time(to, &why_retry, window.start_limit < own_deadline)));
            }
            tracing::debug!(connection_id = %to.connection_id, reason = %why_retry, ?backoff, "retrying");
            Metrics::add(&self.metrics.retried, 1);
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One `PostToConnection` in `slot`, bounded by the recipient's window; its answer is told
    /// to the adaptive limit.
    pub(super) async fn attempt(
        &self,
        client: &Client,
        to: &Recipient,
        body: &Blob,
        slot: limit::Slot<'_>,
        window: &Deadlines,
    ) -> Attempt {
        if Instant::now() >= window.start_limit {
            drop(slot);
            return Attempt::Retry("no time left to start another call".into());
        }
        let within = window.limit.saturating_duration_since(Instant::now()).min(self.settings.call_timeout);
        let call = client.post_to_connection().connection_id(&to.connection_id).data(body.clone()).send();
        let attempt = match tokio::time::timeout(within, call).await {
            Ok(Ok(_)) => Attempt::Ok,
            Ok(Err(err)) => classify(err),
            Err(_) => Attempt::Retry(format!("no response within {within:?}")),
        };
        slot.finish(match &attempt {
            Attempt::Retry(why) if why.starts_with("429") => Finished::Throttled,
            Attempt::Retry(_) => Finished::NoAnswer,
            Attempt::Ok | Attempt::Gone | Attempt::GiveUp(_) => Finished::Answered,
        });
        attempt
    }

    /// What an attempt means for the recipient: done (`Ok`), or why it is tried again (`Err`).
    /// A 410 from a connection older than `young_connection` deletes it; from a young one (its
    /// `$connect` may still be running) it is retried, here or, with `set_aside_young`, beside
    /// the batch.
    pub(super) async fn judge(
        &self,
        to: &Recipient,
        attempt: Attempt,
        set_aside_young: bool,
    ) -> Result<Result<Sent, String>, StoreError> {
        Ok(Err(match attempt {
            Attempt::Ok => {
                Metrics::add(&self.metrics.delivered, 1);
                return Ok(Ok(Sent::Done(Outcome::Delivered)));
            }
            Attempt::Gone => {
                let age = self.clock.now() - to.connected_at;
                if age.to_std().unwrap_or_default() >= self.settings.young_connection {
                    tracing::info!(connection_id = %to.connection_id, "410 Gone: deleting the stale connection");
                    self.store.delete_connection(&to.connection_id, Some(LeftReason::Gone)).await?;
                    Metrics::add(&self.metrics.gone, 1);
                    return Ok(Ok(Sent::Done(Outcome::Gone)));
                }
                if set_aside_young {
                    Metrics::add(&self.metrics.retried, 1);
                    tracing::debug!(connection_id = %to.connection_id, "410 for a young connection: retrying beside the batch");
                    return Ok(Ok(Sent::Young));
                }
                format!("410 for a connection {}ms old: its $connect may still be running", age.num_milliseconds())
            }
            Attempt::Retry(why) => why,
            Attempt::GiveUp(why) => {
                tracing::warn!(connection_id = %to.connection_id, reason = %why, "giving up on recipient");
                Metrics::add(&self.metrics.failed, 1);
                return Ok(Ok(Sent::Done(Outcome::Failed(why))));
            }
        }))
    }

    /// A 429: counted against the client unless the account is throttling. True when the
    /// client has answered 429 for the whole slow-consumer budget, on enough attempts that a
    /// slot's wait between them cannot make two 429s look like two seconds of them, and a
    /// `GetConnection` (whose buffer is not the client's) does not answer 429 too.
    pub(super) async fn throttled_too_long(&self, to: &Recipient, throttled: &mut Throttled, by: Instant) -> bool {
        Metrics::add(&self.metrics.throttled, 1);
        self.note_429(&to.connection_id);
        if self.limit.account_throttled() {
            // The account's quota, not this client: retried, never held against it.
            Metrics::add(&self.metrics.account_throttled, 1);
            *throttled = Throttled::default();
            return false;
        }
        let since = *throttled.since.get_or_insert_with(Instant::now);
        throttled.counted += 1;
        if since.elapsed() < self.settings.slow_consumer || throttled.counted < limit::STREAK {
            return false;
        }
        if self.account_says_throttled(to, by).await {
            Metrics::add(&self.metrics.account_throttled, 1);
            *throttled = Throttled::default();
            return false;
        }
        true
    }

    /// No time for another attempt: unfinished when the batch's window ran out (the record is
    /// redelivered), failed when the recipient's own deadline did.
    pub(super) fn out_of_time(&self, to: &Recipient, last: &str, batch_window: bool) -> Outcome {
        if batch_window {
            let why = format!("the invocation's time ran out; last: {last}");
            tracing::warn!(connection_id = %to.connection_id, reason = %why, "recipient unfinished");
            return Outcome::Unfinished(why);
        }
        let why = format!("deadline of {:?} passed; last: {last}", self.settings.deadline);
        tracing::warn!(connection_id = %to.connection_id, reason = %why, "giving up on recipient");
        Metrics::add(&self.metrics.failed, 1);
        Outcome::Failed(why)
    }

    /// How many 429s in a row the connection has answered, across records.
    pub(super) fn streak(&self, connection_id: &str) -> u32 {
        self.streaks.lock().unwrap_or_else(|p| p.into_inner()).get(connection_id).copied().unwrap_or(0)
    }

    pub(super) fn note_429(&self, connection_id: &str) {
        let mut streaks = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a process never remembers more than this many throttled connections.
        if streaks.len() >= 100_000 && !streaks.contains_key(connection_id) {
            streaks.clear();
        }
        *streaks.entry(connection_id.to_string()).or_default() += 1;
    }

    pub(super) fn clear_streak(&self, connection_id: &str) {
        let mut streaks = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        if !streaks.is_empty() {
            streaks.remove(connection_id);
        }
    }

    /// `GetConnection`, answered within `within`.
    pub(super) async fn probe(&self, connection_id: &str, endpoint: &str, within: Duration) -> Probe {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(endpoint);
        let asked = self.client(endpoint).get_connection().connection_id(connection_id).send();
        match tokio::time::timeout(within, asked).await {
            Ok(Ok(_)) => Probe::Open,
            Ok(Err(err)) => match err.raw_response().map(|r| r.status().as_u16()) {
                _ if err.as_service_error().is_some_and(|e| e.is_gone_exception()) => Probe::Gone,
                Some(410) => Probe::Gone,
                Some(429) => Probe::Throttled,
                _ => Probe::Unknown(DisplayErrorContext(&err).to_string()),
            },
            Err(_) => Probe::Unknown(format!("no answer within {within:?}")),
        }
    }

    /// Asks `GetConnection` about a connection whose sends keep answering 429: a 429 to that too
    /// is the account's quota (a client's full buffer throttles only what is sent to it). Any
    /// other answer leaves the blame with the client.
    pub(super) async fn account_says_throttled(&self, to: &Recipient, by: Instant) -> bool {
        let within = by.saturating_duration_since(Instant::now()).min(self.settings.call_timeout);
        let throttled = self.probe(&to.connection_id, &to.endpoint, within).await == Probe::Throttled;
        if throttled {
            tracing::info!(connection_id = %to.connection_id, "GetConnection answers 429 too: the account is throttled, not the client");
        }
        throttled
    }

    /// Gives up on a slow consumer, and closes it unless configured not to (the `DELETE` bounded
    /// by the time left).
    pub(super) async fn slow_consumer(&self, to: &Recipient, finish_by: Option<Instant>) -> Outcome {
        Metrics::add(&self.metrics.slow_consumers, 1);
        Metrics::add(&self.metrics.failed, 1);
        let budget = self.settings.slow_consumer;
        if !self.settings.close_slow_consumers {
            tracing::warn!(connection_id = %to.connection_id, ?budget, "slow consumer: skipped for this batch");
            return Outcome::Failed(format!("slow consumer: 429 for {budget:?}"));
        }
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        let left = finish_by.map_or(self.settings.call_timeout, |at| at.saturating_duration_since(Instant::now()));
        let close = self.client(endpoint).delete_connection().connection_id(&to.connection_id).send();
        match tokio::time::timeout(left.min(self.settings.call_timeout), close).await {
            Ok(Ok(_)) => tracing::warn!(connection_id = %to.connection_id, ?budget, "slow consumer: closed"),
            Ok(Err(err)) => tracing::warn!(
                connection_id = %to.connection_id,
                error = %DisplayErrorContext(&err),
                "slow consumer: closing it failed; skipped for this batch"
            ),
            Err(_) => {
                tracing::warn!(connection_id = %to.connection_id, "slow consumer: no time left to close it; skipped")
            }
        }
        Outcome::Failed(format!("slow consumer: 429 for {budget:?}; closed"))
    }

    /// Closes a connection the handlers found flooding (`DELETE @connections`); one already gone
    /// is not an error, and a failure is logged (its record is gone: its next frame is refused).
    pub(super) async fn close(&self, to: &Recipient) {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        match self.client(endpoint).delete_connection().connection_id(&to.connection_id).send().await {
            Ok(_) => {
                Metrics::add(&self.metrics.rate_limited_closed, 1);
                tracing::warn!(connection_id = %to.connection_id, "closed: it kept going over its rate limit");
            }
            Err(err) if err.raw_response().is_some_and(|r| r.status().as_u16() == 410) => {}
            Err(err) => tracing::warn!(
                connection_id = %to.connection_id,
                error = %DisplayErrorContext(&err),
                "closing a flooding connection failed"
            ),
        }
    }

    /// One client per endpoint (per API and stage), built once and reused.
    pub(super) fn client(&self, endpoint: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_apigatewaymanagement::config::Builder::from(&self.sdk)
                    .endpoint_url(endpoint)
                    .retry_config(RetryConfig::disabled())
                    .timeout_config(TimeoutConfig::builder().operation_timeout(self.settings.call_timeout).build())
                    .build();
                Client::from_conf(config)
            })
            .clone()
    }
}

pub(super) fn classify(err: SdkError<PostToConnectionError, aws_smithy_runtime_api_http::Response>) -> Attempt {
    let status = err.raw_response().map(|r| r.status().as_u16());
    match err.as_service_error() {
        Some(PostToConnectionError::GoneException(_)) => return Attempt::Gone,
        Some(PostToConnectionError::LimitExceededException(_)) => {
            return Attempt::Retry("429 LimitExceededException".into());
        }
        Some(PostToConnectionError::PayloadTooLargeException(_)) => {
            return Attempt::GiveUp("413 PayloadTooLargeException".into());
        }
        _ => {}
    }
    match status {
        Some(410) => Attempt::Gone,
        Some(429) => Attempt::Retry("429".into()),
        Some(s) if s >= 500 => Attempt::Retry(format!("{s} from API Gateway")),
        Some(s) => Attempt::GiveUp(format!("{s}: {}", DisplayErrorContext(&err))),
        // No response at all: timeout, connection refused, DNS. Worth another try.
        None => Attempt::Retry(format!("no response: {}", DisplayErrorContext(&err))),
    }
}

/// Up to a quarter off the backoff, so that many recipients do not retry in lockstep.
pub(super) fn jitter(d: Duration) -> Duration {
    d - d.mul_f64(fastrand::f64() / 4.0)
}

pub(super) mod aws_smithy_runtime_api_http {
    pub use aws_sdk_apigatewaymanagement::config::http::HttpResponse as Response;
}

//! Big fan-outs that survive a redelivery: a frame for [`RESUMABLE_RECIPIENTS`] or more keeps
//! its progress in the table while it runs, so a retry of its record starts where the last
//! attempt stopped instead of at the first member.

use super::*;

/// A frame for this many recipients keeps its progress in the table ([`Deliverer::apply`]).
pub const RESUMABLE_RECIPIENTS: usize = 1000;
/// How often a big fan-out's progress is written while it runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A big fan-out starts no call this long before the batch's window ends…
pub const PROGRESS_RESERVE: Duration = Duration::from_millis(400);
/// …its calls in flight end twice this long before it, and a progress read or write takes at
/// most this long.
pub const PROGRESS_WRITE: Duration = Duration::from_millis(150);

/// Whether an outcome needs no further attempt: served, gone, or given up on. A young
/// connection's set-aside frame (`Deferred`) and an unfinished one do: a redelivery tries them.
pub(super) fn counts_as_settled(outcome: &Outcome) -> bool {
    !matches!(outcome, Outcome::Unfinished(_) | Outcome::Deferred)
}

/// Writes a big fan-out's progress by `by`; a failure is logged and counted, never an error.
pub(super) async fn progress_write(inner: &Inner, progress: &crate::model::FanoutProgress, by: Instant) {
    progress_io(inner, &progress.pk, "written", by, inner.store.put_fanout_progress(progress)).await;
}

/// A progress read or write, by `by`: progress is a saving, never a condition, so a failure or a
/// time-out is logged and counted (`progress_failures`), and gives `None`.
pub(super) async fn progress_io<T>(
    inner: &Inner,
    key: &str,
    what: &str,
    by: Instant,
    io: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Option<T> {
    let why = match tokio::time::timeout_at(by.into(), io).await {
        Ok(Ok(done)) => return Some(done),
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no answer in time".to_string(),
    };
    tracing::warn!(key, error = %why, "fan-out progress not {what}");
    Metrics::add(&inner.metrics.progress_failures, 1);
    None
}

/// The most connection ids a progress item lists as pending (~150 KB, well under DynamoDB's
/// 400 KB item limit); past it, `through` is lowered, which serves more again and skips nobody.
pub const MAX_PENDING: usize = 5000;

/// What a resumable fan-out has settled, for its progress item: `through` is the highest
/// connection id settled in this attempt or any before; `pending` are this attempt's recipients
/// at or below it not settled (in flight when it was written, or cut off). Recipients of this
/// attempt are exactly those an earlier attempt had not settled.
pub(super) fn progress(
    key: &str,
    order: &[&Recipient],
    settled: &[bool],
    earlier: Option<&crate::model::FanoutProgress>,
    complete: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> crate::model::FanoutProgress {
    let highest = settled.iter().rposition(|s| *s).map(|i| order[i].connection_id.as_str());
    let before = earlier.map(|e| e.through.as_str());
    let mut through = highest.max(before).unwrap_or_default().to_string();
    let mut pending: Vec<String> = order
        .iter()
        .zip(settled)
        .filter(|(r, done)| !**done && r.connection_id.as_str() <= through.as_str())
        .map(|(r, _)| r.connection_id.clone())
        .collect();
    if pending.len() > MAX_PENDING {
        // Everything from the first pending id not kept counts as not started.
        let first_dropped = pending[MAX_PENDING].clone();
        pending.truncate(MAX_PENDING);
        through = order
            .iter()
            .map(|r| r.connection_id.as_str())
            .take_while(|id| *id < first_dropped.as_str())
            .last()
            .unwrap_or_default()
            .to_string();
        pending.retain(|p| p.as_str() <= through.as_str());
    }
    crate::model::FanoutProgress::new(key, through, pending, complete, now)
}

impl Deliverer {
    pub(super) async fn send_resumable(
        &self,
        key: &str,
        payload: &crate::protocol::ServerMessage,
        recipients: &[Recipient],
        window: &Window,
    ) -> Result<Vec<(String, Outcome)>, StoreError> {
        let earlier = self.progress_read(key).await;
        let mut order: Vec<&Recipient> = recipients.iter().collect();
        order.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        if let Some(earlier) = &earlier {
            let before = order.len();
            let settled = earlier.settled_lookup();
            order.retain(|r| !settled(&r.connection_id));
            Metrics::add(&self.inner.metrics.resumed_skips, (before - order.len()) as u64);
            tracing::info!(key, skipped = before - order.len(), left = order.len(), "fan-out resumes where it stopped");
        }
        let cut = |margin: Duration| window.finish_by.map(|at| at.checked_sub(margin).unwrap_or(at));
        // No call starts in the last PROGRESS_RESERVE; calls, then slow consumers' closing, end
        // by 2 × PROGRESS_WRITE before the window; the last write has the PROGRESS_WRITE before it.
        let (start_by, finish_by, write_by) =
            (cut(PROGRESS_RESERVE), cut(PROGRESS_WRITE * 2), cut(Duration::from_millis(10)));
        let body = Blob::new(payload.to_json());
        let sends: Vec<_> = order
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let body = body.clone();
                async move { Ok::<_, StoreError>((i, *r, self.send(r, body, window, start_by, finish_by).await?)) }
            })
            .collect();
        let mut running = futures::stream::iter(sends).buffer_unordered(self.inner.limit.max());
        // Settled in this attempt: served, gone, given up on or set aside. A slow consumer is not,
        // until judged below.
        let mut settled = vec![false; order.len()];
        let mut sent = Vec::with_capacity(order.len());
        let mut written = Instant::now();
        // The periodic write runs beside the sends (awaiting it here would stop them polling).
        let mut writing: Option<tokio::task::JoinHandle<()>> = None;
        while let Some(result) = running.next().await {
            let (i, to, outcome) = result?;
            settled[i] = matches!(&outcome, Sent::Done(o) if counts_as_settled(o));
            sent.push((to, outcome));
            if written.elapsed() >= PROGRESS_EVERY && writing.as_ref().is_none_or(|w| w.is_finished()) {
                let snapshot = progress(key, &order, &settled, earlier.as_ref(), false, self.inner.clock.now());
                let inner = self.inner.clone();
                let by = Instant::now() + PROGRESS_WRITE;
                writing = Some(tokio::spawn(async move { progress_write(&inner, &snapshot, by).await }));
                written = Instant::now();
            }
        }
        drop(running);
        // An earlier attempt settled some: the frame has been served, so recipients still
        // answering 429 now are not all of it.
        let outcomes = self.judge_slow(sent, window, finish_by, earlier.is_some()).await;
        let unsettled: HashSet<&str> =
            outcomes.iter().filter(|(_, o)| !counts_as_settled(o)).map(|(id, _)| id.as_str()).collect();
        let settled: Vec<bool> = order.iter().map(|r| !unsettled.contains(r.connection_id.as_str())).collect();
        if let Some(writing) = writing {
            // The last write must not be overtaken by an older one.
            let _ = tokio::time::timeout(PROGRESS_WRITE, writing).await;
        }
        let last = progress(key, &order, &settled, earlier.as_ref(), unsettled.is_empty(), self.inner.clock.now());
        let by = write_by.unwrap_or_else(|| Instant::now() + PROGRESS_WRITE);
        progress_write(&self.inner, &last, by).await;
        Ok(outcomes)
    }

    pub(super) async fn progress_read(&self, key: &str) -> Option<crate::model::FanoutProgress> {
        let by = Instant::now() + PROGRESS_WRITE;
        progress_io(&self.inner, key, "read; serving every member", by, self.inner.store.fanout_progress(key))
            .await
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipients(ids: &[&str]) -> Vec<Recipient> {
        let at = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        ids.iter()
            .map(|id| Recipient { connection_id: id.to_string(), endpoint: String::new(), connected_at: at })
            .collect()
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
    }

    #[test]
    fn progress_is_the_highest_settled_and_the_unsettled_below_it() {
        let all = recipients(&["a", "b", "c", "d", "e", "f"]);
        let order: Vec<&Recipient> = all.iter().collect();
        // a, b, d settled; c in flight; e and f not started (or cut off after the last write).
        let p = progress("k", &order, &[true, true, false, true, false, false], None, false, now());
        assert_eq!((p.through.as_str(), p.pending.clone()), ("d", vec!["c".to_string()]));
        let served: Vec<&str> = ["a", "b", "c", "d", "e", "f"].into_iter().filter(|id| p.settled(id)).collect();
        assert_eq!(served, ["a", "b", "d"], "a resume serves c, e and f, nobody else");
    }

    #[test]
    fn a_resume_never_moves_progress_back() {
        let all = recipients(&["a", "b", "c", "d", "e", "f"]);
        let first: Vec<&Recipient> = all.iter().collect();
        let earlier = progress("k", &first, &[true, false, true, true, false, false], None, false, now());
        assert_eq!((earlier.through.as_str(), earlier.pending.clone()), ("d", vec!["b".to_string()]));
        // The resume's recipients are those not settled: b, e, f. Only b is done when it writes.
        let second: Vec<&Recipient> = all.iter().filter(|r| !earlier.settled(&r.connection_id)).collect();
        let ids: Vec<&str> = second.iter().map(|r| r.connection_id.as_str()).collect();
        assert_eq!(ids, ["b", "e", "f"]);
        let p = progress("k", &second, &[true, false, false], Some(&earlier), false, now());
        assert_eq!(p.through, "d", "not back to b: c and d were served");
        assert!(p.pending.is_empty());
        assert!(["a", "b", "c", "d"].iter().all(|id| p.settled(id)) && !p.settled("e") && !p.settled("f"));
        let done = progress("k", &second, &[true, true, true], Some(&earlier), true, now());
        assert!(done.complete && done.settled("zzz"));
    }

    #[test]
    fn a_pending_list_past_its_cap_lowers_through_and_skips_nobody() {
        let ids: Vec<String> = (0..MAX_PENDING + 10).map(|i| format!("c{i:06}")).collect();
        let all = recipients(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        let order: Vec<&Recipient> = all.iter().collect();
        // Only the last one settled: every other is pending below it.
        let mut settled = vec![false; order.len()];
        *settled.last_mut().unwrap() = true;
        let p = progress("k", &order, &settled, None, false, now());
        assert!(p.pending.len() <= MAX_PENDING);
        let skipped: Vec<&String> = ids.iter().filter(|id| p.settled(id)).collect();
        assert!(skipped.is_empty(), "{} unsettled recipients would be skipped", skipped.len());
    }
}

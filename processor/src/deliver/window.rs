//! One batch's delivery window: its time, the young connections' retries set aside until the
//! batch ends, and the connections found slow in it.

use super::*;

/// How long a batch, its own work done, still waits for young connections' retries.
pub const YOUNG_GRACE: Duration = Duration::from_secs(1);

/// The time one batch's deliveries may take, the young connections' retries set aside until
/// the batch ends (one ordered queue per connection), and the connections found slow in it.
#[derive(Default)]
pub struct Window {
    pub(super) finish_by: Option<Instant>,
    pub(super) deferred: Mutex<tokio::task::JoinSet<()>>,
    pub(super) queues: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Blob>>>,
    pub(super) slow: Mutex<HashSet<String>>,
}

impl Window {
    /// No deadline (the local stacks, replay, tests).
    pub fn unbounded() -> Window {
        Window::default()
    }

    /// Every delivery of the batch ends by `finish_by`.
    pub fn until(finish_by: Instant) -> Window {
        Window { finish_by: Some(finish_by), ..Window::default() }
    }

    pub fn finish_by(&self) -> Option<Instant> {
        self.finish_by
    }

    pub(super) fn is_slow(&self, connection_id: &str) -> bool {
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).contains(connection_id)
    }

    /// Queues `body` behind the connection's set-aside retries, if it has any; else gives it back.
    pub(super) fn queue_behind(&self, connection_id: &str, body: Blob) -> Result<(), Blob> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match queues.get(connection_id) {
            Some(queue) => queue.send(body).map_err(|e| e.0),
            None => Err(body),
        }
    }

    /// Starts the connection's queue of set-aside retries with `body`: one task delivers them in
    /// order, retrying while the connection is young, until the window closes.
    pub(super) fn set_aside(&self, inner: Arc<Inner>, to: Recipient, body: Blob) {
        let (queue, mut frames) = tokio::sync::mpsc::unbounded_channel();
        let _ = queue.send(body);
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).insert(to.connection_id.clone(), queue);
        let finish_by = self.finish_by;
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).spawn(async move {
            while let Some(body) = frames.recv().await {
                match inner.clone().send(&to, body, finish_by, finish_by, false).await {
                    Ok(Sent::Done(Outcome::Delivered)) => continue,
                    Ok(_) => {
                        tracing::debug!(connection_id = %to.connection_id, "young connection's retries ended undelivered");
                        break;
                    }
                    Err(err) => {
                        tracing::error!(connection_id = %to.connection_id, error = %err, "young connection's retries failed");
                        break;
                    }
                }
            }
        });
    }

    /// Once the batch's own work is done, waits for the set-aside retries for at most
    /// [`YOUNG_GRACE`], and never past the window. Those still running then are dropped
    /// (logged, not deleted): a connection that has not finished connecting by then gets no
    /// frames from this batch; if it is really gone, its `$disconnect` or the sweeper removes it.
    /// Returns how many connections' retries were dropped (`young_dropped`).
    pub async fn settle(&self) -> usize {
        // No more frames join the queues: each task ends when its queue is empty.
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut deferred = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        if deferred.is_empty() {
            return 0;
        }
        let grace = Instant::now() + YOUNG_GRACE;
        let until = self.finish_by.map_or(grace, |at| at.min(grace));
        let all = async { while deferred.join_next().await.is_some() {} };
        if tokio::time::timeout_at(until.into(), all).await.is_ok() {
            return 0;
        }
        let dropped = deferred.len();
        tracing::warn!(dropped, "young connections still answering 410; their frames from this batch are dropped");
        deferred.abort_all();
        dropped
    }
}

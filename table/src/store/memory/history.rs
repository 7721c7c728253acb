//! The embedded adapter's [`HistoryStore`]: messages and signals, verdicts, history pages, idempotent sends.

use super::*;

#[async_trait]
impl HistoryStore for MemoryStore {
    async fn put_message(&self, message: &Message) -> Result<()> {
        self.put_record(message)
    }

    async fn put_signal(&self, signal: &crate::model::Signal) -> Result<()> {
        self.put_record(signal)
    }

    async fn put_user_message(&self, message: &crate::model::UserMessage) -> Result<()> {
        self.put_record(message)
    }

    async fn history_page(
        &self,
        tenant: &str,
        room: &str,
        from: &HistoryFrom,
        limit: usize,
        now: DateTime<Utc>,
        viewer: Option<&str>,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        let mut bytes = 0usize;
        use std::ops::Bound::{Excluded, Included};
        let table = self.lock();
        let pk = model::room_pk(tenant, room);
        let key = |sk: &str| (pk.clone(), sk.to_string());
        let (lo, hi) = match from {
            HistoryFrom::Latest => (Included(key(MESSAGES_FROM)), Excluded(key(MESSAGES_TO))),
            HistoryFrom::Before(sk) => (Included(key(MESSAGES_FROM)), Excluded(key(sk))),
            HistoryFrom::After(sk) => (Excluded(key(sk)), Excluded(key(MESSAGES_TO))),
        };
        if matches!((&lo, &hi), (Included(a) | Excluded(a), Excluded(b)) if a >= b) {
            return Ok(Vec::new());
        }
        let range = table.items.range((lo, hi)).map(|(_, item)| item);
        let items: Box<dyn Iterator<Item = &Item>> =
            if matches!(from, HistoryFrom::After(_)) { Box::new(range) } else { Box::new(range.rev()) };
        let mut page = Vec::new();
        for item in items {
            if let Some(m) = self.decode::<Message>(item)
                && !is_expired(m.ttl, now)
                && m.rejected.is_none()
                && m.visible_to(viewer)
            {
                bytes = bytes.saturating_add(m.delivered_body.as_ref().unwrap_or(&m.body).len());
                page.push(m);
                if page.len() == limit || bytes > max_bytes {
                    break;
                }
            }
        }
        if !matches!(from, HistoryFrom::After(_)) {
            page.reverse();
        }
        Ok(page)
    }

    async fn put_message_once(
        &self,
        message: &Message,
        record: &IdempotencyRecord,
        now: DateTime<Utc>,
    ) -> Result<Message> {
        let mut table = self.lock();
        let key = (record.pk.clone(), record.sk.clone());
        if let Some(earlier) = self.get::<IdempotencyRecord>(&table, &key)
            && !is_expired(earlier.ttl, now)
        {
            let original = (earlier.message.pk.clone(), earlier.message.sk.clone());
            if !table.items.contains_key(&original) {
                let item = encode(&earlier.message)?;
                self.put_item(&mut table, item);
            }
            return Ok(earlier.message);
        }
        let (record_item, message_item) = (encode(record)?, encode(message)?);
        self.put_item(&mut table, record_item);
        self.put_item(&mut table, message_item);
        Ok(message.clone())
    }

    async fn mark_message(&self, tenant: &str, room: &str, sk: &str, verdict: &crate::model::Verdict) -> Result<()> {
        let mut table = self.lock();
        let (name, value) = match verdict {
            crate::model::Verdict::Rejected(reason) => ("rejected", AttributeValue::S(reason.clone())),
            crate::model::Verdict::Rewritten(text) => ("deliveredBody", AttributeValue::S(text.clone())),
            crate::model::Verdict::Audience(users) => {
                ("onlyUsers", AttributeValue::L(users.iter().map(|u| AttributeValue::S(u.clone())).collect()))
            }
        };
        self.update(&mut table, &(model::room_pk(tenant, room), sk.to_string()), &[(name, Some(value))]);
        Ok(())
    }

    async fn message(&self, tenant: &str, room: &str, sk: &str, now: DateTime<Utc>) -> Result<Option<Message>> {
        let table = self.lock();
        let message: Option<Message> = self.get(&table, &(model::room_pk(tenant, room), sk.to_string()));
        Ok(message.filter(|m| !is_expired(m.ttl, now)))
    }
}

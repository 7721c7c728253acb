//! The DynamoDB adapter's [`HistoryStore`]: messages and signals, verdicts, history pages, idempotent sends.

use super::*;

#[async_trait]
impl HistoryStore for DynamoStore {
    async fn put_message(&self, message: &Message) -> Result<()> {
        self.put_record(message, "put_item").await
    }

    async fn put_signal(&self, signal: &crate::model::Signal) -> Result<()> {
        self.put_record(signal, "put_item (signal)").await
    }

    async fn put_user_message(&self, message: &crate::model::UserMessage) -> Result<()> {
        self.put_record(message, "put_item (user message)").await
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
        // BETWEEN is inclusive: the cursor's own key is dropped below.
        let (lo, hi, cursor, newest_first) = match from {
            HistoryFrom::Latest => (MESSAGES_FROM, MESSAGES_TO, None, true),
            HistoryFrom::Before(sk) => (MESSAGES_FROM, sk.as_str(), Some(sk.as_str()), true),
            HistoryFrom::After(sk) => (sk.as_str(), MESSAGES_TO, Some(sk.as_str()), false),
        };
        if lo >= hi {
            return Ok(Vec::new());
        }
        let mut page = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND sk BETWEEN :lo AND :hi",
            values: vec![(":pk", s(&model::room_pk(tenant, room))), (":lo", s(lo)), (":hi", s(hi))],
            newest_first,
            // Items that do not decode or have expired are rare; the cursor's own item is one more.
            page_size: i32::try_from(limit.saturating_add(2)).ok(),
            growing: max_bytes < usize::MAX,
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            let is_cursor = matches!((cursor, item.get("sk")), (Some(c), Some(AttributeValue::S(sk))) if sk == c);
            if !is_cursor
                && let Some(m) = self.decode::<Message>(item)
                && !is_expired(m.ttl, now)
                && m.rejected.is_none()
                && m.visible_to(viewer)
            {
                bytes = bytes.saturating_add(m.delivered_body.as_ref().unwrap_or(&m.body).len());
                page.push(m);
            }
            Ok(page.len() < limit && bytes <= max_bytes)
        })
        .await?;
        if newest_first {
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
        let claim = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(record)?))
            .condition_expression("attribute_not_exists(pk) OR #ttl <= :now")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":now", AttributeValue::N(now.timestamp().to_string()))
            .send()
            .await;
        if written("put_item (idempotency key)", claim)? {
            // Only if a repeat has not written it already (and the processor marked it).
            self.put_if_absent(message).await?;
            return Ok(message.clone());
        }
        let claimed: Option<IdempotencyRecord> =
            self.get_typed("get_item (idempotency key)", key(record.pk.clone(), record.sk.clone())).await?;
        let Some(claimed) = claimed else {
            // Claimed, then gone (its TTL, or a record that does not decode): the caller retries.
            return Err(StoreError::Unavailable(format!(
                "idempotency key {} could not be read; try again",
                record.key
            )));
        };
        let original = &claimed.message;
        if self.message(&original.tenant, &original.room, &original.sk, now).await?.is_none() {
            // The first send claimed the key and died before its message: finish it.
            self.put_if_absent(original).await?;
        }
        Ok(claimed.message)
    }

    async fn mark_message(&self, tenant: &str, room: &str, sk: &str, verdict: &crate::model::Verdict) -> Result<()> {
        let (name, value) = match verdict {
            crate::model::Verdict::Rejected(reason) => ("rejected", s(reason)),
            crate::model::Verdict::Rewritten(text) => ("deliveredBody", s(text)),
            crate::model::Verdict::Audience(users) => {
                ("onlyUsers", AttributeValue::L(users.iter().map(|u| s(u)).collect()))
            }
        };
        self.mark(key(model::room_pk(tenant, room), sk.to_string()), name, value).await
    }

    async fn message(&self, tenant: &str, room: &str, sk: &str, now: DateTime<Utc>) -> Result<Option<Message>> {
        let message: Option<Message> =
            self.get_typed("get_item (message)", key(model::room_pk(tenant, room), sk.to_string())).await?;
        Ok(message.filter(|m| !is_expired(m.ttl, now)))
    }
}

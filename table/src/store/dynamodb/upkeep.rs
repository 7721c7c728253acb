//! The DynamoDB adapter's [`UpkeepStore`]: rate-limit counters, the sweeper's shards and lease, fan-out progress.

use super::*;

#[async_trait]
impl UpkeepStore for DynamoStore {
    async fn count_in_window(&self, key: &str, window: i64) -> Result<u64> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(&model::limit_pk(key)))
            .key("sk", s(&format!("W#{window}")))
            .update_expression("ADD n :one SET #ttl = :ttl, #type = :type")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_names("#type", "type")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":ttl", AttributeValue::N((window + 120).to_string()))
            .expression_attribute_values(":type", s("limit"))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| unavailable("update_item (rate limit)", e))?;
        Ok(match out.attributes.as_ref().and_then(|a| a.get("n")) {
            Some(AttributeValue::N(n)) => n.parse().unwrap_or(u64::MAX),
            _ => u64::MAX,
        })
    }

    async fn stale_connections(&self, shard: u32, cutoff: DateTime<Utc>) -> Result<Vec<Connection>> {
        let mut found = Vec::new();
        let spec = QuerySpec {
            index: Some(SWEEP_INDEX),
            key_condition: "sweepPk = :s AND lastSeenAt < :cutoff",
            values: vec![(":s", s(&model::sweep_shard_pk(shard))), (":cutoff", s(&model::format_ts(&cutoff)))],
            page_size: Some(500),
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(conn) = self.decode::<Connection>(item) {
                found.push(conn);
            }
            Ok(true)
        })
        .await?;
        Ok(found)
    }

    async fn present_users(&self, shard: u32) -> Result<Vec<Presence>> {
        let mut found = Vec::new();
        let spec = QuerySpec {
            index: Some(SWEEP_INDEX),
            key_condition: "sweepPk = :s",
            values: vec![(":s", s(&format!("SWEEP#P{shard:02}")))],
            page_size: Some(500),
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(p) = self.decode::<Presence>(item).filter(|p| p.present()) {
                found.push(p);
            }
            Ok(true)
        })
        .await?;
        Ok(found)
    }

    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> Result<Option<u32>> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::SWEEPER_PK.into(), model::SWEEPER_LEASE_SK.into())))
            .update_expression("SET #until = :until, #type = :type, #owner = :owner")
            .condition_expression("attribute_not_exists(pk) OR #until < :now")
            .expression_attribute_names("#until", "until")
            .expression_attribute_names("#type", "type")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":until", AttributeValue::N(until.to_string()))
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
            .expression_attribute_values(":type", s("sweeper"))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(match out.attributes.as_ref().and_then(|a| a.get("nextShard")) {
                Some(AttributeValue::N(n)) => n.parse().unwrap_or(0) % model::SWEEP_SHARDS,
                _ => 0,
            })),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(None),
            Err(err) => Err(unavailable("update_item (sweeper lease)", err)),
        }
    }

    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> Result<bool> {
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::SWEEPER_PK.into(), model::SWEEPER_LEASE_SK.into())))
            .update_expression(if release { "SET #until = :zero, nextShard = :next" } else { "SET nextShard = :next" })
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":next", AttributeValue::N(next_shard.to_string()));
        if release {
            update = update
                .expression_attribute_names("#until", "until")
                .expression_attribute_values(":zero", AttributeValue::N("0".into()));
        }
        written("update_item (sweeper lease)", update.send().await)
    }

    async fn mark_seen(&self, connection_id: &str, now: DateTime<Utc>) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .update_expression("SET lastSeenAt = :seen")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":seen", s(&format_ts(&now)))
            .send()
            .await;
        // Deleted meanwhile ($disconnect): nothing to mark.
        written("update_item (connection seen)", result).map(|_| ())
    }

    async fn fanout_progress(&self, key: &str) -> Result<Option<model::FanoutProgress>> {
        self.get_typed(
            "get_item (fan-out progress)",
            self::key(model::fanout_pk(key), model::FANOUT_PROGRESS_SK.into()),
        )
        .await
    }

    async fn put_fanout_progress(&self, progress: &model::FanoutProgress) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(progress)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (fan-out progress)", e))?;
        Ok(())
    }
}

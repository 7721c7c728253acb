//! The DynamoDB adapter's [`ConnectionStore`]: open sockets' records.

use super::*;

#[async_trait]
impl ConnectionStore for DynamoStore {
    async fn put_connection(&self, conn: &Connection, memberships: &[Membership]) -> Result<()> {
        let mut items = vec![self.put(encode(conn)?)?];
        for m in memberships {
            items.push(self.put(encode(m)?)?);
        }
        self.transact("put_connection", &conn.connection_id, items).await?;
        let bumps = memberships.iter().map(|m| self.bump_now(&m.tenant, &m.room));
        futures::future::try_join_all(bumps).await.map(|_| ())
    }

    async fn get_connection(&self, connection_id: &str, now: DateTime<Utc>) -> Result<Option<Connection>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(connection_key(connection_id)))
            .send()
            .await
            .map_err(|e| unavailable("get_item", e))?;
        let conn: Option<Connection> = out.item.and_then(|item| self.decode(item));
        Ok(conn.filter(|c| !is_expired(c.ttl, now)))
    }

    async fn delete_connection(&self, connection_id: &str, reason: Option<LeftReason>) -> Result<Option<Connection>> {
        if let Some(reason) = reason {
            self.mark(connection_key(connection_id), "closeReason", s(reason.as_str())).await?;
        }
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| unavailable("delete_item", e))?;
        Ok(out.attributes.filter(|a| !a.is_empty()).and_then(|item| self.decode(item)))
    }

    async fn touch(&self, conn: &Connection, now: DateTime<Utc>, ttl: i64) -> Result<()> {
        let refresh = |key: DynamoItem, set: &str| {
            let mut update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key))
                .update_expression(set)
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#ttl", "ttl")
                .expression_attribute_values(":ttl", AttributeValue::N(ttl.to_string()));
            if set.contains(":seen") {
                // sweepPk too: a connection written before the sweep index joins it on its next ping.
                update = update
                    .expression_attribute_values(":seen", s(&format_ts(&now)))
                    .expression_attribute_values(":sp", s(&model::sweep_pk(&conn.connection_id)));
            }
            update.build().map_err(build_error).map(|u| TransactWriteItem::builder().update(u).build())
        };
        let mut items =
            vec![refresh(connection_key(&conn.connection_id), "SET lastSeenAt = :seen, #ttl = :ttl, sweepPk = :sp")?];
        for room in &conn.rooms {
            items.push(refresh(membership_key(&conn.tenant, room, &conn.connection_id), "SET #ttl = :ttl")?);
        }
        self.transact("touch", &conn.connection_id, items).await
    }

    async fn user_connections(&self, tenant: &str, user_id: &str, now: DateTime<Utc>) -> Result<Vec<Connection>> {
        let mut found = Vec::new();
        let spec = QuerySpec {
            index: Some(GSI1),
            key_condition: "gsi1pk = :u AND begins_with(gsi1sk, :conn)",
            values: vec![(":u", s(&model::user_gsi1pk(tenant, user_id))), (":conn", s("CONN#"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(c) = self.decode::<Connection>(item)
                && !is_expired(c.ttl, now)
            {
                found.push(c);
            }
            Ok(true)
        })
        .await?;
        Ok(found)
    }

    async fn scan_connections(&self, limit: usize, after: Option<&str>) -> Result<Vec<Connection>> {
        self.scan_typed("scan", "#t = :type", "connection", limit, after.map(connection_key)).await
    }

    async fn set_status(&self, connection_id: &str, status: &str) -> Result<Option<Connection>> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .update_expression("SET #s = :s")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", s(status))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(out.attributes.and_then(|item| self.decode(item))),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(None),
            Err(err) => Err(unavailable("update_item", err)),
        }
    }

    async fn set_claims(
        &self,
        connection_id: &str,
        claims: &std::collections::BTreeMap<String, String>,
    ) -> Result<bool> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#c", "claims");
        let update = match claims.is_empty() {
            true => update.update_expression("REMOVE #c"),
            false => {
                let map = claims.iter().map(|(k, v)| (k.clone(), s(v))).collect();
                update.update_expression("SET #c = :c").expression_attribute_values(":c", AttributeValue::M(map))
            }
        };
        match update.send().await {
            Ok(_) => Ok(true),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(false),
            Err(err) => Err(unavailable("update_item", err)),
        }
    }
}

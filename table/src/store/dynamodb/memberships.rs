//! The DynamoDB adapter's [`MembershipStore`]: who has joined which room, pending joins, the roster version.

use super::*;

#[async_trait]
impl MembershipStore for DynamoStore {
    async fn join(&self, membership: &Membership) -> Result<bool> {
        // A pending join also marks the connection as one whose joins wait (it may have opened
        // before its tenant's plugin decided joins).
        let pending = membership.pending == Some(true);
        let add = if pending { "ADD rooms :r, pendingRooms :r SET authorizeJoins = :t" } else { "ADD rooms :r" };
        let mut add_room = Update::builder()
            .table_name(&self.table)
            .set_key(Some(connection_key(&membership.connection_id)))
            .update_expression(add)
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":r", string_set(&membership.room));
        if pending {
            add_room = add_room.expression_attribute_values(":t", AttributeValue::Bool(true));
        }
        let add_room = add_room.build().map_err(build_error)?;
        // Not over a live membership of the same room (another frame's join, written first).
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(encode(membership)?))
            .condition_expression("attribute_not_exists(pk) OR #ttl < :now")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":now", AttributeValue::N(membership.joined_at.timestamp().to_string()))
            .build()
            .map_err(build_error)?;
        let items =
            vec![TransactWriteItem::builder().put(put).build(), TransactWriteItem::builder().update(add_room).build()];
        match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => {}
            Err(err) => {
                if let SdkError::ServiceError(service) = &err
                    && let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err()
                {
                    let failed = |i: usize| {
                        cancel.cancellation_reasons().get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
                    };
                    if failed(1) {
                        return Err(StoreError::NoConnection(membership.connection_id.clone()));
                    }
                    if failed(0) {
                        return Ok(false);
                    }
                }
                return Err(unavailable("join", err));
            }
        }
        self.bump_now(&membership.tenant, &membership.room).await?;
        Ok(true)
    }

    async fn settle_join(&self, m: &Membership, allowed: bool) -> Result<bool> {
        let key = membership_key(&m.tenant, &m.room, &m.connection_id);
        let pending = m.pending == Some(true);
        if allowed && !pending {
            // Allowed and never pending: nothing to change.
            return Ok(true);
        }
        // The decision is this membership's: the same join (`joinedNs`), in the state it was
        // decided in.
        let mut condition = if pending {
            "attribute_exists(pk) AND pending = :t".to_string()
        } else {
            "attribute_exists(pk) AND attribute_not_exists(pending)".to_string()
        };
        if m.joined_ns.is_some() {
            condition.push_str(" AND joinedNs = :ns");
        }
        let same_join = |mut update: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder| {
            if pending {
                update = update.expression_attribute_values(":t", AttributeValue::Bool(true));
            }
            if let Some(ns) = m.joined_ns {
                update = update.expression_attribute_values(":ns", AttributeValue::N(ns.to_string()));
            }
            update
        };
        // The connection's side, idempotent: written after the membership when allowing (so
        // that a retry can repair it), before its deletion when denying.
        let connection = match (allowed, pending) {
            (true, _) => "DELETE pendingRooms :r, deniedRooms :r",
            (false, true) => "DELETE pendingRooms :r, rooms :r ADD deniedRooms :r",
            // A denial of a join that did not wait also marks its connection: its next joins wait.
            (false, false) => "DELETE pendingRooms :r, rooms :r ADD deniedRooms :r SET authorizeJoins = :yes",
        };
        let update_connection = || async {
            let mut update = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(connection_key(&m.connection_id)))
                .update_expression(connection)
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_values(":r", string_set(&m.room));
            if connection.contains(":yes") {
                update = update.expression_attribute_values(":yes", AttributeValue::Bool(true));
            }
            written("update_item (settle join)", update.send().await)
        };
        if allowed {
            let update = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key.clone()))
                .update_expression("REMOVE pending");
            let applied =
                written("update_item (allow join)", same_join(update).condition_expression(&condition).send().await)?;
            if !applied {
                // Already allowed (a retry after the connection's write failed)? Then finish it.
                let now: Option<Membership> = self.get_typed("get_item (membership)", key).await?;
                if now.is_some_and(|n| n.pending.is_none() && n.joined_ns == m.joined_ns) {
                    // The bump too may not have happened: it is idempotent enough (one more
                    // version only makes containers read the room again).
                    self.bump_now(&m.tenant, &m.room).await?;
                    update_connection().await?;
                }
                return Ok(false);
            }
            // The member is served from the next message on: the version moves before the join
            // is acknowledged.
            self.bump_now(&m.tenant, &m.room).await?;
            update_connection().await?;
            return Ok(true);
        }
        let mark = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .update_expression("SET leftReason = :reason")
            .expression_attribute_values(":reason", s(LeftReason::Denied.as_str()))
            .condition_expression(&condition);
        if !written("update_item (deny join)", same_join(mark).send().await)? {
            if !pending {
                // A redelivery after the deletion: its bump may be the one that was lost.
                self.bump_now(&m.tenant, &m.room).await?;
            }
            return Ok(false);
        }
        update_connection().await?;
        // Only the join that was denied: a leave and a new join in between keep theirs.
        let mut delete = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .condition_expression("leftReason = :reason")
            .expression_attribute_values(":reason", s(LeftReason::Denied.as_str()));
        if let Some(ns) = m.joined_ns {
            delete = delete
                .condition_expression("leftReason = :reason AND joinedNs = :ns")
                .expression_attribute_values(":ns", AttributeValue::N(ns.to_string()));
        }
        written("delete_item (denied join)", delete.send().await)?;
        self.bump_now(&m.tenant, &m.room).await?;
        Ok(true)
    }

    async fn leave(&self, connection_id: &str, tenant: &str, room: &str) -> Result<()> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(membership_key(tenant, room, connection_id)))
            .build()
            .map_err(build_error)?;
        let drop_room = Update::builder()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .update_expression("DELETE rooms :r, pendingRooms :r")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":r", string_set(room))
            .build()
            .map_err(build_error)?;
        let items = vec![
            TransactWriteItem::builder().delete(delete).build(),
            TransactWriteItem::builder().update(drop_room).build(),
        ];
        self.transact("leave", connection_id, items).await?;
        self.bump_now(tenant, room).await
    }

    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>> {
        let mut members = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND begins_with(sk, :conn)",
            values: vec![(":pk", s(&model::room_pk(tenant, room))), (":conn", s("CONN#"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(m) = self.decode::<Membership>(item)
                && !is_expired(m.ttl, now)
            {
                members.push(m);
            }
            Ok(true)
        })
        .await?;
        Ok(members)
    }

    async fn mark_left(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        self.mark(membership_key(tenant, room, connection_id), "leftReason", s(reason.as_str())).await
    }

    async fn remove_membership(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        self.mark(membership_key(tenant, room, connection_id), "leftReason", s(reason.as_str())).await?;
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(membership_key(tenant, room, connection_id)))
            .send()
            .await
            .map_err(|e| unavailable("delete_item", e))?;
        self.bump_now(tenant, room).await
    }

    async fn bump_roster(&self, tenant: &str, room: &str) -> Result<()> {
        self.bump_now(tenant, room).await
    }

    async fn roster_version(&self, tenant: &str, room: &str) -> Result<Option<u64>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(roster_key(tenant, room)))
            .projection_expression("v")
            .send()
            .await
            .map_err(|e| unavailable("get_item (roster version)", e))?;
        Ok(out.item.and_then(|item| match item.get("v") {
            Some(AttributeValue::N(n)) => n.parse().ok(),
            _ => None,
        }))
    }
}

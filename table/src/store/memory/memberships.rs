//! The embedded adapter's [`MembershipStore`]: who has joined which room, pending joins, the roster version.

use super::*;

#[async_trait]
impl MembershipStore for MemoryStore {
    async fn join(&self, membership: &Membership) -> Result<bool> {
        let mut table = self.lock();
        let key = connection_key(&membership.connection_id);
        let Some(mut conn) = self.get::<Connection>(&table, &key) else {
            return Err(StoreError::NoConnection(membership.connection_id.clone()));
        };
        let member_key = membership_key(&membership.tenant, &membership.room, &membership.connection_id);
        let existing: Option<Membership> = self.get(&table, &member_key);
        if existing.is_some_and(|m| !is_expired(m.ttl, membership.joined_at)) {
            return Ok(false);
        }
        let member_item = encode(membership)?;
        self.put_item(&mut table, member_item);
        bump(&mut table, &membership.tenant, &membership.room);
        let pending = membership.pending == Some(true) && conn.pending_rooms.insert(membership.room.clone());
        if pending {
            conn.authorize_joins = true;
        }
        if conn.rooms.insert(membership.room.clone()) || pending {
            let item = encode(&conn)?;
            self.put_item(&mut table, item);
        }
        Ok(true)
    }

    async fn settle_join(&self, m: &Membership, allowed: bool) -> Result<bool> {
        // Under the lock, one atomic step (the DynamoDB adapter's order makes it retryable).
        let mut table = self.lock();
        let key = membership_key(&m.tenant, &m.room, &m.connection_id);
        let current: Option<Membership> = self.get(&table, &key);
        let same =
            current.is_some_and(|c| c.pending == m.pending && (m.joined_ns.is_none() || c.joined_ns == m.joined_ns));
        if !same {
            return Ok(false);
        }
        if allowed {
            if m.pending != Some(true) {
                return Ok(true);
            }
            self.update(&mut table, &key, &[("pending", None)]);
        } else {
            self.update(
                &mut table,
                &key,
                &[("leftReason", Some(AttributeValue::S(LeftReason::Denied.as_str().into())))],
            );
            self.delete_item(&mut table, &key, Actor::Client);
        }
        bump(&mut table, &m.tenant, &m.room);
        if let Some(mut conn) = self.get::<Connection>(&table, &connection_key(&m.connection_id)) {
            conn.pending_rooms.remove(&m.room);
            if allowed {
                conn.denied_rooms.remove(&m.room);
            } else {
                conn.rooms.remove(&m.room);
                conn.denied_rooms.insert(m.room.clone());
                // A denial of a join that did not wait also marks its connection.
                conn.authorize_joins = true;
            }
            let item = encode(&conn)?;
            self.put_item(&mut table, item);
        }
        Ok(true)
    }

    async fn leave(&self, connection_id: &str, tenant: &str, room: &str) -> Result<()> {
        let mut table = self.lock();
        let key = connection_key(connection_id);
        let Some(mut conn) = self.get::<Connection>(&table, &key) else {
            return Err(StoreError::NoConnection(connection_id.into()));
        };
        self.delete_item(&mut table, &membership_key(tenant, room, connection_id), Actor::Client);
        bump(&mut table, tenant, room);
        if conn.rooms.remove(room) | conn.pending_rooms.remove(room) {
            let item = encode(&conn)?;
            self.put_item(&mut table, item);
        }
        Ok(())
    }

    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>> {
        let table = self.lock();
        let pk = model::room_pk(tenant, room);
        let from = (pk.clone(), "CONN#".to_string());
        let to = (pk, "CONN$".to_string());
        let mut members = Vec::new();
        for item in table.items.range(from..to).map(|(_, item)| item) {
            if let Some(m) = self.decode::<Membership>(item)
                && !is_expired(m.ttl, now)
            {
                members.push(m);
            }
        }
        Ok(members)
    }

    async fn bump_roster(&self, tenant: &str, room: &str) -> Result<()> {
        bump(&mut self.lock(), tenant, room);
        Ok(())
    }

    async fn roster_version(&self, tenant: &str, room: &str) -> Result<Option<u64>> {
        Ok(self.lock().rosters.get(&model::room_pk(tenant, room)).copied())
    }

    async fn mark_left(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        let mut table = self.lock();
        let key = membership_key(tenant, room, connection_id);
        self.update(&mut table, &key, &[("leftReason", Some(AttributeValue::S(reason.as_str().into())))]);
        Ok(())
    }

    async fn remove_membership(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        let mut table = self.lock();
        let key = membership_key(tenant, room, connection_id);
        if self.update(&mut table, &key, &[("leftReason", Some(AttributeValue::S(reason.as_str().into())))]).is_some() {
            self.delete_item(&mut table, &key, Actor::Client);
        }
        bump(&mut table, tenant, room);
        Ok(())
    }
}

//! The embedded adapter's [`ConnectionStore`]: open sockets' records.

use super::*;

#[async_trait]
impl ConnectionStore for MemoryStore {
    async fn put_connection(&self, conn: &Connection, memberships: &[Membership]) -> Result<()> {
        let items = std::iter::once(encode(conn)).chain(memberships.iter().map(encode)).collect::<Result<Vec<_>>>()?;
        let mut table = self.lock();
        for item in items {
            self.put_item(&mut table, item);
        }
        for m in memberships {
            bump(&mut table, &m.tenant, &m.room);
        }
        Ok(())
    }

    async fn get_connection(&self, connection_id: &str, now: DateTime<Utc>) -> Result<Option<Connection>> {
        let table = self.lock();
        let conn: Option<Connection> = self.get(&table, &connection_key(connection_id));
        Ok(conn.filter(|c| !is_expired(c.ttl, now)))
    }

    async fn delete_connection(&self, connection_id: &str, reason: Option<LeftReason>) -> Result<Option<Connection>> {
        let mut table = self.lock();
        let key = connection_key(connection_id);
        if let Some(reason) = reason {
            self.update(&mut table, &key, &[("closeReason", Some(AttributeValue::S(reason.as_str().into())))]);
        }
        Ok(self.delete_item(&mut table, &key, Actor::Client).and_then(|old| self.decode(&old)))
    }

    async fn touch(&self, conn: &Connection, now: DateTime<Utc>, ttl: i64) -> Result<()> {
        let mut table = self.lock();
        let Some(mut current) = self.get::<Connection>(&table, &connection_key(&conn.connection_id)) else {
            return Err(StoreError::NoConnection(conn.connection_id.clone()));
        };
        current.last_seen_at = now;
        current.ttl = ttl;
        current.sweep_pk.get_or_insert_with(|| model::sweep_pk(&current.connection_id));
        let item = encode(&current)?;
        self.put_item(&mut table, item);
        for room in &current.rooms {
            let key = membership_key(&current.tenant, room, &current.connection_id);
            self.update(&mut table, &key, &[("ttl", Some(AttributeValue::N(ttl.to_string())))]);
        }
        Ok(())
    }

    async fn user_connections(&self, tenant: &str, user_id: &str, now: DateTime<Utc>) -> Result<Vec<Connection>> {
        let table = self.lock();
        let gsi1pk = model::user_gsi1pk(tenant, user_id);
        let mut found = Vec::new();
        for item in table.items.values() {
            if matches!(item.get("gsi1pk"), Some(AttributeValue::S(k)) if *k == gsi1pk)
                && matches!(item.get("type"), Some(AttributeValue::S(t)) if t == "connection")
                && let Some(c) = self.decode::<Connection>(item)
                && !is_expired(c.ttl, now)
            {
                found.push(c);
            }
        }
        Ok(found)
    }

    async fn scan_connections(&self, limit: usize, after: Option<&str>) -> Result<Vec<Connection>> {
        let table = self.lock();
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(connection_key(id)),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = Vec::new();
        for (key, item) in table.items.range((from, std::ops::Bound::Unbounded)) {
            if page.len() == limit {
                break;
            }
            if ItemKind::of(&key.0, &key.1) == Some(ItemKind::Connection) {
                page.extend(self.decode(item));
            }
        }
        Ok(page)
    }

    async fn set_status(&self, connection_id: &str, status: &str) -> Result<Option<Connection>> {
        let mut table = self.lock();
        let set = [("status", Some(AttributeValue::S(status.to_string())))];
        Ok(self.update(&mut table, &connection_key(connection_id), &set).and_then(|item| self.decode(&item)))
    }

    async fn set_claims(
        &self,
        connection_id: &str,
        claims: &std::collections::BTreeMap<String, String>,
    ) -> Result<bool> {
        let mut table = self.lock();
        let map = claims.iter().map(|(k, v)| (k.clone(), AttributeValue::S(v.clone()))).collect();
        let value = (!claims.is_empty()).then_some(AttributeValue::M(map));
        Ok(self.update(&mut table, &connection_key(connection_id), &[("claims", value)]).is_some())
    }
}

//! The embedded adapter's [`UpkeepStore`]: rate-limit counters, the sweeper's shards and lease, fan-out progress.

use super::*;

#[async_trait]
impl UpkeepStore for MemoryStore {
    async fn count_in_window(&self, key: &str, window: i64) -> Result<u64> {
        let mut table = self.lock();
        if table.counters.len() > 100_000 {
            table.counters.retain(|(_, w), _| *w >= window - 1);
        }
        let count = table.counters.entry((key.to_string(), window)).or_default();
        *count += 1;
        Ok(*count)
    }

    async fn stale_connections(&self, shard: u32, cutoff: DateTime<Utc>) -> Result<Vec<Connection>> {
        let table = self.lock();
        let key = model::sweep_shard_pk(shard);
        let mut found: Vec<Connection> = table
            .items
            .values()
            .filter(|item| matches!(item.get("sweepPk"), Some(AttributeValue::S(k)) if *k == key))
            .filter_map(|item| self.decode::<Connection>(item))
            .filter(|c| c.last_seen_at < cutoff)
            .collect();
        found.sort_by_key(|c| c.last_seen_at);
        Ok(found)
    }

    async fn present_users(&self, shard: u32) -> Result<Vec<Presence>> {
        let table = self.lock();
        let key = format!("SWEEP#P{shard:02}");
        Ok(table
            .items
            .values()
            .filter(|item| matches!(item.get("sweepPk"), Some(AttributeValue::S(k)) if *k == key))
            .filter_map(|item| self.decode::<Presence>(item))
            .filter(|p| p.present())
            .collect())
    }

    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> Result<Option<u32>> {
        let mut table = self.lock();
        if table.sweep_lease.0 >= now {
            return Ok(None);
        }
        table.sweep_lease.0 = until;
        table.sweep_lease.2 = owner.to_string();
        Ok(Some(table.sweep_lease.1))
    }

    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> Result<bool> {
        let mut table = self.lock();
        if table.sweep_lease.2 != owner {
            return Ok(false);
        }
        table.sweep_lease.1 = next_shard % model::SWEEP_SHARDS;
        if release {
            table.sweep_lease.0 = 0;
        }
        Ok(true)
    }

    async fn mark_seen(&self, connection_id: &str, now: DateTime<Utc>) -> Result<()> {
        let mut table = self.lock();
        let key = connection_key(connection_id);
        self.update(&mut table, &key, &[("lastSeenAt", Some(AttributeValue::S(model::format_ts(&now))))]);
        Ok(())
    }

    async fn fanout_progress(&self, key: &str) -> Result<Option<model::FanoutProgress>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::fanout_pk(key), model::FANOUT_PROGRESS_SK.to_string())))
    }

    async fn put_fanout_progress(&self, progress: &model::FanoutProgress) -> Result<()> {
        let item = encode(progress)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }
}

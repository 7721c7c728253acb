//! The DynamoDB adapter's [`PresenceStore`]: presence as state: transitions, runs, `who`, counts.

use super::*;

#[async_trait]
impl PresenceStore for DynamoStore {
    async fn scan_presence(&self, limit: usize, after: Option<(String, String)>) -> Result<Vec<Presence>> {
        let filter = "#t = :type AND attribute_exists(connections)";
        self.scan_typed("scan (presence)", filter, "presence", limit, after.map(|(pk, sk)| key(pk, sk))).await
    }

    async fn put_presence_suspects(&self, p: &Presence) -> Result<bool> {
        let write = self.presence_write(key(p.pk.clone(), p.sk.clone()), Some(p), Guard::Version(p.ver - 1))?;
        self.write_plan(vec![write]).await
    }

    async fn apply_presence(&self, update: &PresenceUpdate) -> Result<PresenceOutcome> {
        let pk = model::presence_pk(&update.tenant, &update.room);
        let user_key = key(pk.clone(), model::presence_sk(&update.user_id));
        let room_key = key(pk, model::ROOM_PRESENCE_SK.into());
        for _ in 0..PRESENCE_ATTEMPTS {
            let ((current, user_there), (room, room_there)) = tokio::try_join!(
                self.get_guarded::<Presence>("get_item (presence)", user_key.clone()),
                self.get_guarded::<RoomPresence>("get_item (room presence)", room_key.clone()),
            )?;
            let (presence, presence_ver, next_room, outcome) =
                match crate::presence::plan(update, current.as_ref(), room.as_ref()) {
                    Plan::Done(outcome) => return Ok(outcome),
                    Plan::Write { presence, presence_ver, room, outcome } => (presence, presence_ver, room, outcome),
                };
            let user_guard = Guard::of(presence_ver, user_there);
            let mut writes = vec![self.presence_write(user_key.clone(), presence.as_ref(), user_guard)?];
            if let Some(next) = &next_room {
                writes.push(self.room_presence_write(next, Guard::of(room.as_ref().map(|r| r.ver), room_there))?);
            }
            if self.write_plan(writes).await? {
                return Ok(outcome);
            }
            tracing::debug!(room = %update.room, user = %update.user_id, "presence write lost a race; planning again");
            tokio::time::sleep(Duration::from_millis(2 + (uuid::Uuid::new_v4().as_u128() % 8) as u64)).await;
        }
        Err(StoreError::Unavailable(format!(
            "presence of {} in {} kept changing under {PRESENCE_ATTEMPTS} attempts",
            update.user_id, update.room
        )))
    }

    async fn migrate_presence(&self, tenant: &str, room: &str) -> Result<bool> {
        let old = model::room_pk(tenant, room);
        let count = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(old.clone(), model::ROOM_PRESENCE_SK.into())))
            .send()
            .await
            .map_err(|e| unavailable("get_item (room presence, old key)", e))?
            .item;
        let Some(count) = count else { return Ok(false) };
        let mut items = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND begins_with(sk, :user)",
            values: vec![(":pk", s(&old)), (":user", s("USER#"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            items.push(item);
            Ok(true)
        })
        .await?;
        // The users first, the count last: a copy cut off is made again on the next batch (the
        // count still missing), and what was copied already is not copied over.
        let new = s(&model::presence_pk(tenant, room));
        let copied = items.len();
        for mut item in items.into_iter().chain(std::iter::once(count)) {
            item.insert("pk".into(), new.clone());
            let sent = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await;
            match sent {
                Ok(_) => {}
                Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {}
                Err(e) => return Err(unavailable("put_item (presence, migrated)", e)),
            }
        }
        tracing::info!(tenant, room, users = copied, "presence copied from the room's key to its own");
        Ok(true)
    }

    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> Result<()> {
        // The version moves too: a run planned from the item as it was must plan again.
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::presence_pk(tenant, room), model::presence_sk(user_id))))
            .update_expression("SET announced = :no, ver = ver + :one")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => Ok(()),
            Err(e) => Err(unavailable("update_item (presence announced)", e)),
        }
    }

    async fn apply_presence_run(&self, updates: &[PresenceUpdate]) -> Result<Vec<PresenceOutcome>> {
        let Some(first) = updates.first() else { return Ok(Vec::new()) };
        // One room's records; a run of one is the record on its own.
        let same = updates.iter().take_while(|u| u.tenant == first.tenant && u.room == first.room).count();
        let updates = &updates[..same];
        if updates.len() == 1 {
            return Ok(vec![self.apply_presence(first).await?]);
        }
        let pk = model::presence_pk(&first.tenant, &first.room);
        let room_key = key(pk.clone(), model::ROOM_PRESENCE_SK.into());
        for attempt in 0..PRESENCE_ATTEMPTS {
            let (room, room_there) =
                self.get_guarded::<RoomPresence>("get_item (room presence)", room_key.clone()).await?;
            // A room that announces ends its run at its first transition: its later users are
            // not worth reading. One past its limit reads up to 99.
            let announcing = crate::presence::announces(
                room.as_ref().map_or(0, |r| r.users).saturating_add(1),
                first.announce_max_users,
            );
            let max_users = if announcing { 1 } else { crate::presence::RUN_USERS };
            let wanted = crate::presence::run_users(updates, max_users);
            let (users, there) = self.presences(&pk, &wanted).await?;
            let run = crate::presence::plan_run(updates, &users, room.as_ref(), max_users);
            let mut writes = Vec::with_capacity(run.users.len() + 1);
            for (user, after) in &run.users {
                let guard = Guard::of(users.get(user).map(|p| p.ver), there.contains(user));
                writes.push(self.presence_write(key(pk.clone(), model::presence_sk(user)), after.as_ref(), guard)?);
            }
            if let Some(next) = &run.room {
                writes.push(self.room_presence_write(next, Guard::of(room.as_ref().map(|r| r.ver), room_there))?);
            }
            if writes.is_empty() || self.write_plan(writes).await? {
                return Ok(run.outcomes);
            }
            tracing::debug!(room = %first.room, records = updates.len(), "presence run lost a race or was throttled; planning again");
            // Backing off: a run is cancelled by a race (planned again at once) or by the room's
            // partition being out of write units (which takes its time to refill).
            let backoff = (2u64 << attempt.min(9)).min(1000);
            tokio::time::sleep(Duration::from_millis(backoff + (uuid::Uuid::new_v4().as_u128() % 8) as u64)).await;
        }
        Err(StoreError::Unavailable(format!(
            "presence of {} kept changing under {PRESENCE_ATTEMPTS} attempts",
            first.room
        )))
    }

    async fn who(&self, tenant: &str, room: &str, limit: usize, after: Option<&str>) -> Result<WhoPage> {
        let pk = model::presence_pk(tenant, room);
        let mut page = WhoPage::default();
        let mut start: Option<DynamoItem> = after.map(|user| key(pk.clone(), model::presence_sk(user)));
        // One more than asked tells whether there is a next page.
        'pages: loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("pk = :pk AND begins_with(sk, :user)")
                // Tombstones (users who left in the last two days) are read and passed over
                // here rather than returned; `Limit` counts them, so it is twice the page.
                .filter_expression("attribute_exists(connections)")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":user", s("USER#"))
                .set_limit(i32::try_from(limit.saturating_add(1).saturating_mul(2)).ok())
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable("query (who)", e))?;
            for item in out.items.unwrap_or_default() {
                let Some(p) = self.decode::<Presence>(item) else { continue };
                // A tombstone (the user left; their connections' marks kept a while) is not a user here.
                if !p.present() {
                    continue;
                }
                if page.users.len() == limit {
                    page.next = page.users.last().map(|(user, _)| user.clone());
                    break 'pages;
                }
                page.versions.push(p.version);
                page.users.push((p.user_id, p.connections.len()));
            }
            match out.last_evaluated_key {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => break,
            }
        }
        page.total = self.room_presence(tenant, room).await?.map_or(0, |r| r.users);
        Ok(page)
    }

    async fn presence(&self, tenant: &str, room: &str, user_id: &str) -> Result<Option<Presence>> {
        self.get_typed("get_item (presence)", key(model::presence_pk(tenant, room), model::presence_sk(user_id))).await
    }

    async fn room_presence(&self, tenant: &str, room: &str) -> Result<Option<RoomPresence>> {
        self.get_typed(
            "get_item (room presence)",
            key(model::presence_pk(tenant, room), model::ROOM_PRESENCE_SK.into()),
        )
        .await
    }
}

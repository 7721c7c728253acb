//! The embedded adapter's [`PresenceStore`]: presence as state: transitions, runs, `who`, counts.

use super::*;

#[async_trait]
impl PresenceStore for MemoryStore {
    async fn scan_presence(&self, limit: usize, after: Option<(String, String)>) -> Result<Vec<Presence>> {
        let table = self.lock();
        let from = match after {
            Some(key) => std::ops::Bound::Excluded(key),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = Vec::new();
        for (key, item) in table.items.range((from, std::ops::Bound::Unbounded)) {
            if page.len() == limit {
                break;
            }
            if key.0.starts_with("PRESENCE#") && ItemKind::of(&key.0, &key.1) == Some(ItemKind::Presence) {
                page.extend(self.decode::<Presence>(item).filter(|p| p.present()));
            }
        }
        Ok(page)
    }

    async fn put_presence_suspects(&self, p: &Presence) -> Result<bool> {
        let mut table = self.lock();
        let current: Option<Presence> = self.get(&table, &(p.pk.clone(), p.sk.clone()));
        if current.is_none_or(|c| c.ver + 1 != p.ver) {
            return Ok(false);
        }
        let item = encode(p)?;
        self.put_item(&mut table, item);
        Ok(true)
    }

    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> Result<()> {
        let mut table = self.lock();
        let key = (model::presence_pk(tenant, room), model::presence_sk(user_id));
        if let Some(mut p) = self.get::<Presence>(&table, &key) {
            p.announced = false;
            p.ver += 1;
            let item = encode(&p)?;
            self.put_item(&mut table, item);
        }
        Ok(())
    }

    async fn apply_presence(&self, update: &PresenceUpdate) -> Result<PresenceOutcome> {
        // Under the lock: the read, the plan and its writes are one atomic step.
        let mut table = self.lock();
        let user_key = (model::presence_pk(&update.tenant, &update.room), model::presence_sk(&update.user_id));
        let room_key = (user_key.0.clone(), model::ROOM_PRESENCE_SK.to_string());
        let current: Option<Presence> = self.get(&table, &user_key);
        let room: Option<RoomPresence> = self.get(&table, &room_key);
        match crate::presence::plan(update, current.as_ref(), room.as_ref()) {
            Plan::Done(outcome) => Ok(outcome),
            Plan::Write { presence, room, outcome, .. } => {
                match presence {
                    Some(p) => {
                        let item = encode(&p)?;
                        self.put_item(&mut table, item);
                    }
                    None => {
                        self.delete_item(&mut table, &user_key, Actor::Client);
                    }
                }
                if let Some(room) = room {
                    let item = encode(&room)?;
                    self.put_item(&mut table, item);
                }
                Ok(outcome)
            }
        }
    }

    async fn who(&self, tenant: &str, room: &str, limit: usize, after: Option<&str>) -> Result<WhoPage> {
        let table = self.lock();
        let pk = model::presence_pk(tenant, room);
        let from = match after {
            Some(user) => std::ops::Bound::Excluded((pk.clone(), model::presence_sk(user))),
            None => std::ops::Bound::Included((pk.clone(), "USER#".to_string())),
        };
        let to = std::ops::Bound::Excluded((pk.clone(), "USER$".to_string()));
        let mut page = WhoPage::default();
        for (_, item) in table.items.range((from, to)) {
            let Some(p) = self.decode::<Presence>(item) else { continue };
            // A tombstone (the user left; their connections' marks kept a while) is not a user here.
            if !p.present() {
                continue;
            }
            if page.users.len() == limit {
                page.next = page.users.last().map(|(user, _)| user.clone());
                break;
            }
            page.versions.push(p.version);
            page.users.push((p.user_id, p.connections.len()));
        }
        page.total =
            self.get::<RoomPresence>(&table, &(pk, model::ROOM_PRESENCE_SK.to_string())).map_or(0, |r| r.users);
        Ok(page)
    }

    async fn presence(&self, tenant: &str, room: &str, user_id: &str) -> Result<Option<Presence>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::presence_pk(tenant, room), model::presence_sk(user_id))))
    }

    async fn room_presence(&self, tenant: &str, room: &str) -> Result<Option<RoomPresence>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::presence_pk(tenant, room), model::ROOM_PRESENCE_SK.to_string())))
    }
}

//! A plugin version's record or a tenant's `ACTIVE` pointer: the tenant rules' bookkeeping
//! (activate, reject, follow), never anything a client hears of. A dry run shows it only.

use super::{Processor, Reaction};
use crate::store::StoreError;
use crate::stream::Change;

pub(super) async fn changed(p: &Processor, change: &Change) -> Result<Reaction, StoreError> {
    let Some(rules) = &p.rules else { return Ok(Reaction::default()) };
    let plugin_actions = rules.on_plugin_record(change, p.mode).await?;
    Ok(Reaction { plugin_actions, ..Reaction::default() })
}

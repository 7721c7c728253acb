//! The stream as DynamoDB Streams and Lambda really deliver it, for tests and `roomcast dev
//! --per-item-order SEED`: order kept per item only.
//!
//! DynamoDB Streams orders the records of one item (one primary key); a partition that splits (a
//! hot room is what adaptive capacity splits) puts one room's items on two shards, and Lambda
//! reads shards, and with `ParallelizationFactor` above 1 the batches of one shard, at the same
//! time. Nothing orders a room's records across its items. A local stream (moto's, the embedded
//! store's) is one ordered line, so code that leans on more order than AWS gives passes there.
//!
//! [`PerItemOrder`] imposes what AWS allows and nothing more, chosen by a seed:
//!
//! * each item's records go to one of [`PerItemOrder::shards`] shards, by a hash of its key and
//!   the seed, keeping their order;
//! * each shard is cut into batches of 1 to [`PerItemOrder::max_batch`] records;
//! * the batches are handed on in an interleaving the seed picks: one shard's next batch alone,
//!   or two shards' next batches at the same time (two invocations at once);
//! * one batch in [`PerItemOrder::redeliver_one_in`] is delivered a second time right after
//!   (Lambda retries a failed batch before the shard's next one), so a record can be handled
//!   again after records of other items handled meanwhile.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use aws_lambda_events::dynamodb::EventRecord;

/// One batch handed on: the shard it came from, its records, whether it is a redelivery.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub shard: usize,
    pub records: Vec<EventRecord>,
    pub redelivery: bool,
}

/// A seeded stream of per-item order (see the module's documentation).
#[derive(Clone, Debug)]
pub struct PerItemOrder {
    seed: u64,
    rng: fastrand::Rng,
    /// How many shards a table's items are spread over.
    pub shards: usize,
    /// The most records in one batch.
    pub max_batch: usize,
    /// One batch in this many is delivered twice (0: none).
    pub redeliver_one_in: u32,
}

impl PerItemOrder {
    /// Two shards, batches of up to 8, one in four delivered twice.
    pub fn new(seed: u64) -> PerItemOrder {
        PerItemOrder { seed, rng: fastrand::Rng::with_seed(seed), shards: 2, max_batch: 8, redeliver_one_in: 4 }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The shard of a record: every record of one item lands on the same one.
    pub fn shard_of(&self, record: &EventRecord) -> usize {
        let mut keys: Vec<(String, String)> = record
            .change
            .keys
            .iter()
            .map(|(name, value)| (name.clone(), serde_json::to_string(value).unwrap_or_default()))
            .collect();
        keys.sort();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.seed, keys).hash(&mut hasher);
        (hasher.finish() % self.shards.max(1) as u64) as usize
    }

    /// `records` (in stream order) as a sequence of steps: each step one batch, or two batches of
    /// two shards to be handled at the same time.
    pub fn schedule(&mut self, records: Vec<EventRecord>) -> Vec<Vec<Delivery>> {
        let mut shards: Vec<VecDeque<Vec<EventRecord>>> = vec![VecDeque::new(); self.shards.max(1)];
        let mut split: Vec<Vec<EventRecord>> = vec![Vec::new(); self.shards.max(1)];
        for r in records {
            let shard = self.shard_of(&r);
            split[shard].push(r);
        }
        for (shard, records) in split.into_iter().enumerate() {
            let mut records = records.into_iter().peekable();
            while records.peek().is_some() {
                let size = self.rng.usize(1..=self.max_batch.max(1));
                shards[shard].push_back(records.by_ref().take(size).collect());
            }
        }
        let mut steps = Vec::new();
        loop {
            let waiting: Vec<usize> = (0..shards.len()).filter(|&s| !shards[s].is_empty()).collect();
            if waiting.is_empty() {
                return steps;
            }
            let together = waiting.len() > 1 && self.rng.bool();
            let mut chosen: Vec<usize> = if together {
                let first = waiting[self.rng.usize(0..waiting.len())];
                let others: Vec<usize> = waiting.iter().copied().filter(|&s| s != first).collect();
                vec![first, others[self.rng.usize(0..others.len())]]
            } else {
                vec![waiting[self.rng.usize(0..waiting.len())]]
            };
            chosen.sort_unstable();
            let step: Vec<Delivery> = chosen
                .iter()
                .map(|&shard| Delivery {
                    shard,
                    records: shards[shard].pop_front().unwrap_or_default(),
                    redelivery: false,
                })
                .collect();
            let again: Vec<Delivery> = step
                .iter()
                .filter(|_| self.redeliver_one_in > 0 && self.rng.u32(0..self.redeliver_one_in) == 0)
                .map(|d| Delivery { redelivery: true, ..d.clone() })
                .collect();
            steps.push(step);
            if !again.is_empty() {
                steps.push(again);
            }
        }
    }

    /// Hands `records` on as [`PerItemOrder::schedule`] orders them, the batches of one step at
    /// the same time.
    pub async fn deliver<F, Fut>(&mut self, records: Vec<EventRecord>, handle: F)
    where
        F: Fn(Delivery) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        for step in self.schedule(records) {
            futures::future::join_all(step.into_iter().map(&handle)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pk: &str, sk: &str, seq: u64) -> EventRecord {
        serde_json::from_value(serde_json::json!({
            "eventID": format!("e{seq}"), "eventName": "INSERT", "eventVersion": "1.1",
            "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
            "dynamodb": {"Keys": {"pk": {"S": pk}, "sk": {"S": sk}}, "SequenceNumber": seq.to_string(),
                         "SizeBytes": 10, "StreamViewType": "NEW_AND_OLD_IMAGES"}
        }))
        .unwrap()
    }

    #[test]
    fn each_item_keeps_its_order_and_a_room_spreads_over_both_shards() {
        let records: Vec<EventRecord> =
            (0..200).map(|i| record("ROOM#acme#general", &format!("CONN#c{}", i % 20), i)).collect();
        for seed in 0..50 {
            let mut order = PerItemOrder::new(seed);
            let steps = order.schedule(records.clone());
            let mut last: std::collections::HashMap<String, u64> = Default::default();
            let mut shards = std::collections::HashSet::new();
            let mut delivered = 0;
            for d in steps.iter().flatten() {
                shards.insert(d.shard);
                if d.redelivery {
                    continue;
                }
                for r in &d.records {
                    delivered += 1;
                    let seq: u64 = r.change.sequence_number.as_deref().unwrap().parse().unwrap();
                    let key = serde_json::to_string(&r.change.keys).unwrap();
                    assert!(last.insert(key, seq).is_none_or(|before| before < seq), "seed {seed}");
                }
            }
            assert_eq!(delivered, records.len(), "seed {seed}: every record once, redeliveries aside");
            assert_eq!(shards.len(), 2, "seed {seed}: one room's records on two shards");
            assert!(steps.iter().any(|s| s.len() == 2), "seed {seed}: two batches at the same time");
            assert!(steps.iter().flatten().any(|d| d.redelivery), "seed {seed}: a batch delivered again");
        }
    }
}

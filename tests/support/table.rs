//! Tables on both stores, and their streams.

use super::*;

/// Where a test reads the table's stream from.
pub enum StreamSource {
    Memory(mpsc::UnboundedReceiver<EventRecord>),
    Dynamo(Box<StreamPoller>),
}

impl StreamSource {
    pub async fn dynamo(stream_arn: &str) -> StreamSource {
        let sdk = sdk_config().await;
        let client = roomcast::config::streams_client(&sdk, Some(&moto_endpoint()));
        StreamSource::Dynamo(Box::new(StreamPoller::new(client, stream_arn, StartAt::TrimHorizon)))
    }

    /// Every record written since the last call, in stream order.
    pub async fn drain(&mut self) -> Vec<EventRecord> {
        let mut records = Vec::new();
        match self {
            StreamSource::Memory(rx) => {
                while let Ok(r) = rx.try_recv() {
                    records.push(r);
                }
            }
            StreamSource::Dynamo(poller) => loop {
                let batch = poller.poll().await.expect("poll the stream");
                if batch.records.is_empty() {
                    break;
                }
                records.extend(batch.records);
            },
        }
        records
    }
}

/// A store under test with its stream.
pub struct Table {
    pub store: Arc<dyn Store>,
    pub stream: StreamSource,
    pub memory: Option<Arc<MemoryStore>>,
    /// The DynamoDB adapter, for writes beneath the store's operations ([`Table::put_raw`]).
    pub dynamo: Option<DynamoStore>,
    /// Where the store counts items that do not decode; a [`Stack`]'s processor counts in it too.
    pub metrics: Arc<Metrics>,
    pub kind: &'static str,
}

impl Table {
    pub async fn memory(clock: Arc<dyn Clock>) -> Table {
        let metrics = Arc::new(Metrics::default());
        let store = MemoryStore::with_metrics(clock, metrics.clone());
        Table {
            stream: StreamSource::Memory(store.subscribe()),
            store: store.clone(),
            memory: Some(store),
            dynamo: None,
            metrics,
            kind: "memory",
        }
    }

    /// The embedded store on `clock` (`"memory"`), or a new table on moto (`"dynamodb"`).
    pub async fn on(kind: &str, clock: &Arc<ManualClock>) -> Table {
        match kind {
            "memory" => Table::memory(clock.clone()).await,
            "dynamodb" => Table::dynamodb().await,
            other => panic!("unknown store kind {other}"),
        }
    }

    pub async fn dynamodb() -> Table {
        let (store, arn) = moto_table().await;
        Table::on_moto(store, &arn).await
    }

    /// A table on moto whose every call goes through `partitions` (one partition's latency and
    /// throughput, `roomcast::partitions`); its stream is read from moto directly.
    pub async fn dynamodb_behind(partitions: &roomcast::partitions::Partitions) -> Table {
        let (_, arn, name) = moto_table_named().await;
        let client = roomcast::config::dynamodb_client(&sdk_config().await, Some(&partitions.endpoint));
        Table::on_moto(DynamoStore::new(client, name), &arn).await
    }

    /// A table made by [`moto_table`], its stream read from the start.
    pub async fn on_moto(store: DynamoStore, arn: &str) -> Table {
        let metrics = Arc::new(Metrics::default());
        let store = store.with_metrics(metrics.clone());
        Table {
            store: Arc::new(store.clone()),
            stream: StreamSource::dynamo(arn).await,
            memory: None,
            dynamo: Some(store),
            metrics,
            kind: "dynamodb",
        }
    }

    /// Writes an item as it is, past the records' types (`PutItem` on DynamoDB): what a newer
    /// handler or a console edit writes.
    pub async fn put_raw(&self, item: serde_dynamo::Item) {
        match (&self.memory, &self.dynamo) {
            (Some(memory), _) => memory.put_raw(item),
            (None, Some(dynamo)) => {
                dynamo
                    .client()
                    .put_item()
                    .table_name(dynamo.table())
                    .set_item(Some(item.into()))
                    .send()
                    .await
                    .expect("put a raw item");
            }
            (None, None) => panic!("a table without an adapter to write through"),
        }
    }
}

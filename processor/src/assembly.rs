//! The one place a processor and its deliverers are put together: the processor Lambda, the
//! `fanout`, `sweeper` and `admin` functions, `roomcast dev` and `poll`, replay, the benches and
//! the tests all build theirs from an [`Assembly`], so a new setting is added here once and a
//! mode (a dry run) is set once for the processor and everything it sends.
//!
//! ```text
//! let processor = Assembly::from_config(&config, sdk, store, clock, metrics).processor();
//! ```
//!
//! What a caller adds stays a builder call on the [`Processor`]: a tenant's rules
//! (`with_plugins`, in the plugin host), the fan-out stage (`with_hand_off`, whose workers take
//! [`Assembly::deliverer`]), the metrics' EMF output.

use std::sync::Arc;

use crate::config::Config;
use crate::deliver::{Deliverer, DeliverySettings};
use crate::metrics::Metrics;
use crate::model::Clock;
use crate::pipeline::Processor;
use crate::rules::Mode;
use crate::store::Store;

/// What a processor is made of.
#[derive(Clone)]
pub struct Assembly {
    /// The AWS configuration `@connections` clients are made from (a dry run makes none).
    pub sdk: aws_config::SdkConfig,
    pub delivery: DeliverySettings,
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// Partition keys a batch handles at once (`ROOMCAST_PARTITIONS_AT_ONCE`).
    pub partitions_at_once: usize,
    /// Rooms with more users announce no `joined`/`left` unless a tenant says otherwise.
    pub announce_max_users: u64,
    /// `Execute`, or `DryRun`: nothing sent, deleted or written, by the processor or its
    /// deliverers.
    pub mode: Mode,
}

impl Assembly {
    /// The defaults: the delivery settings' own, eight partition keys at once, executing.
    pub fn new(
        sdk: aws_config::SdkConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Assembly {
        Assembly {
            sdk,
            delivery: DeliverySettings::default(),
            store,
            clock,
            metrics,
            partitions_at_once: 8,
            announce_max_users: crate::presence::DEFAULT_ANNOUNCE_MAX_USERS,
            mode: Mode::Execute,
        }
    }

    /// As the Lambda's environment configures it.
    pub fn from_config(
        config: &Config,
        sdk: aws_config::SdkConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Assembly {
        Assembly {
            delivery: config.delivery.clone(),
            partitions_at_once: config.partitions_at_once,
            announce_max_users: config.presence_announce_max_users,
            ..Assembly::new(sdk, store, clock, metrics)
        }
    }

    pub fn with_delivery(self, delivery: DeliverySettings) -> Assembly {
        Assembly { delivery, ..self }
    }

    pub fn with_mode(self, mode: Mode) -> Assembly {
        Assembly { mode, ..self }
    }

    /// A deliverer of its own (its concurrency limit, its clients): the processor's, or a
    /// fan-out worker's, as each Lambda container has its own.
    pub fn deliverer(&self) -> Deliverer {
        let deliverer = Deliverer::new(
            self.sdk.clone(),
            self.delivery.clone(),
            self.store.clone(),
            self.clock.clone(),
            self.metrics.clone(),
        );
        deliverer.with_dry_run(self.mode == Mode::DryRun)
    }

    /// The processor, with a deliverer of its own.
    pub fn processor(&self) -> Processor {
        Processor::new(
            self.store.clone(),
            self.deliverer(),
            self.clock.clone(),
            self.metrics.clone(),
            self.partitions_at_once,
        )
        .with_mode(self.mode)
        .with_announce_max_users(self.announce_max_users)
    }
}

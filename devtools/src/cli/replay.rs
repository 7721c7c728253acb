//! `roomcast capture` and `roomcast replay`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config;
use crate::replay::{Compare, Execute, Options, capture};
use crate::store::Store;
use crate::store::dynamodb::{DynamoStore, wait_until_active};
use crate::stream::poller::{StartAt, StreamPoller};

#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    table: super::TableArgs,
    /// Where to start: trim-horizon (everything the stream holds), latest (only what comes next)
    /// or at:SEQUENCE_NUMBER.
    #[arg(long, default_value = "trim-horizon", value_parser = clap::value_parser!(StartAt))]
    from: StartAt,
    /// Stop after this many records.
    #[arg(long, conflicts_with = "until_idle")]
    limit: Option<usize>,
    /// Stop as soon as no shard has anything new.
    #[arg(long)]
    until_idle: bool,
    /// The JSON lines file to write (one stream record per line, as Lambda receives them).
    #[arg(long, value_name = "FILE.jsonl")]
    out: PathBuf,
}

pub async fn capture_main(args: CaptureArgs) -> anyhow::Result<()> {
    let sdk = config::load_aws().await;
    let client = config::dynamodb_client(&sdk, args.table.dynamodb_endpoint.as_deref());
    let stream_arn = wait_until_active(&client, &args.table.table).await?;
    let streams = config::streams_client(&sdk, args.table.dynamodb_endpoint.as_deref());
    let mut poller = StreamPoller::new(streams, stream_arn.clone(), args.from.clone());
    let file = std::fs::File::create(&args.out).map_err(|e| anyhow::anyhow!("creating {}: {e}", args.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    eprintln!(
        "capturing {stream_arn} into {}{}",
        args.out.display(),
        if args.until_idle { "" } else { "; Ctrl-C stops" }
    );
    let until = capture::Until { limit: args.limit, idle: args.until_idle };
    let written = capture::capture(&mut poller, &mut out, until, stopped, |n, shard, seq| {
        eprint!("\rcaptured {n} records (shard {shard}, last sequence number {seq})   ");
    })
    .await?;
    out.flush()?;
    eprintln!("\ncaptured {written} records into {}", args.out.display());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// A Lambda DynamoDB stream event, JSON lines of stream records (`roomcast capture`,
    /// `roomcast dev --stream-log`), or the on-failure destination's message for a failed batch.
    /// `-` reads standard input.
    input: PathBuf,
    /// One JSON object per record instead of text.
    #[arg(long)]
    json: bool,
    /// Add each plugin call's wall time (the only output that differs between runs).
    #[arg(long)]
    timings: bool,
    /// Take room members from the input's own connection and membership records: no table needed.
    #[arg(long)]
    membership_from_stream: bool,
    /// The table for room members and tenants' active plugins (and, with --execute, deletions).
    #[arg(long, env = "TABLE_NAME")]
    table: Option<String>,
    /// A DynamoDB API other than AWS's; also where a failed batch's records are fetched from.
    #[arg(long, env = "DYNAMODB_ENDPOINT_URL")]
    dynamodb_endpoint: Option<String>,
    /// Replay a tenant with this component instead of its active plugin (repeatable).
    #[arg(long = "plugin", value_name = "TENANT=FILE.wasm")]
    plugins: Vec<String>,
    /// A tenant's plugin configuration for this replay (a JSON object of strings), in place of
    /// what the table holds now (repeatable): the same files replay byte for byte the same.
    #[arg(long = "config", value_name = "TENANT=FILE.json")]
    configs: Vec<String>,
    /// Replay twice, with a tenant's old and new component, and print only the records whose
    /// decisions differ.
    #[arg(long, value_name = "TENANT=OLD.wasm,NEW.wasm")]
    compare: Option<String>,
    /// Apply the effects for real: post to the connections and delete from the table.
    #[arg(long)]
    execute: bool,
    /// With --execute: send every @connections call here instead of each connection's endpoint.
    #[arg(long, env = "ROOMCAST_MANAGEMENT_ENDPOINT")]
    management_endpoint: Option<String>,
}

/// Exit status: 0 when every record was replayed, 2 when any was skipped or failed.
pub async fn replay_main(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let text = if args.input.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| anyhow::anyhow!("reading standard input: {e}"))?
    } else {
        std::fs::read_to_string(&args.input).map_err(|e| anyhow::anyhow!("reading {}: {e}", args.input.display()))?
    };
    // Only what needs AWS loads its configuration: a replay from a capture alone never does.
    let needs_aws = args.table.is_some() || args.execute || text.contains("DDBStreamBatchInfo");
    let sdk = if needs_aws { config::load_aws().await } else { aws_config::SdkConfig::builder().build() };
    let table = match &args.table {
        Some(name) => {
            let client = config::dynamodb_client(&sdk, args.dynamodb_endpoint.as_deref());
            Some(Arc::new(DynamoStore::new(client, name)) as Arc<dyn Store>)
        }
        None => None,
    };
    if table.is_none() && !args.membership_from_stream {
        anyhow::bail!(
            "say where room members come from: --table NAME (and --dynamodb-endpoint), or --membership-from-stream"
        );
    }
    let mut plugins = Vec::new();
    for spec in &args.plugins {
        let (tenant, file) =
            spec.split_once('=').ok_or_else(|| anyhow::anyhow!("--plugin {spec:?}: expected TENANT=FILE.wasm"))?;
        plugins.push((tenant.to_string(), crate::plugins::read_component(file.as_ref())?));
    }
    let mut configs = Vec::new();
    for spec in &args.configs {
        let (tenant, file) =
            spec.split_once('=').ok_or_else(|| anyhow::anyhow!("--config {spec:?}: expected TENANT=FILE.json"))?;
        configs.push((tenant.to_string(), crate::cli::plugins::read_config(file.as_ref())?));
    }
    let compare = match &args.compare {
        Some(spec) => {
            let parsed = spec.split_once('=').and_then(|(tenant, files)| {
                files.split_once(',').map(|(old, new)| (tenant.to_string(), old.to_string(), new.to_string()))
            });
            let Some((tenant, old, new)) = parsed else {
                anyhow::bail!("--compare {spec:?}: expected TENANT=OLD.wasm,NEW.wasm");
            };
            Some(Compare {
                tenant,
                old: crate::plugins::read_component(old.as_ref())?,
                new: crate::plugins::read_component(new.as_ref())?,
            })
        }
        None => None,
    };
    let execute = args.execute.then(|| Execute {
        sdk: sdk.clone(),
        delivery: crate::deliver::DeliverySettings {
            endpoint_override: args.management_endpoint.clone(),
            ..Default::default()
        },
    });
    let options = Options {
        json: args.json,
        timings: args.timings,
        membership_from_stream: args.membership_from_stream,
        table,
        streams: needs_aws.then(|| config::streams_client(&sdk, args.dynamodb_endpoint.as_deref())),
        plugins,
        configs,
        compare,
        execute,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = crate::replay::replay(&text, &options, &mut out).await?;
    out.flush()?;
    let mut line = format!("replayed {} records", summary.replayed);
    if summary.skipped > 0 {
        line.push_str(&format!("; skipped {}", summary.skipped));
    }
    if summary.failed > 0 {
        line.push_str(&format!("; {} failed (the table was unavailable)", summary.failed));
    }
    if options.compare.is_some() {
        line.push_str(&format!("; {} decided differently", summary.differing));
    }
    if options.execute.is_none() {
        line.push_str(" (dry run: nothing was sent or written)");
    }
    eprintln!("{line}");
    Ok(if summary.skipped + summary.failed > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

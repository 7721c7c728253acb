//! Making the table as the template does (`roomcast table create`, `roomcast dev`, the tests):
//! keys, indexes, stream, TTL, on-demand billing; and waiting for it to be active.

use super::*;

/// What `create_table` found or made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub name: String,
    pub stream_arn: String,
    pub created: bool,
}

/// Creates the table exactly as `template.yaml` declares it: `pk`/`sk` strings, the `gsi1` index
/// (`gsi1pk`/`gsi1sk`, all attributes), on-demand billing, stream `NEW_AND_OLD_IMAGES`, TTL on
/// `ttl`. An existing table is left as it is and described.
pub async fn create_table(client: &Client, table: &str) -> anyhow::Result<TableInfo> {
    use anyhow::Context;
    let attr =
        |name: &str| AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build();
    let key_el = |name: &str, kind: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(kind).build();
    let created = client
        .create_table()
        .table_name(table)
        .set_attribute_definitions(Some(vec![
            attr("pk")?,
            attr("sk")?,
            attr("gsi1pk")?,
            attr("gsi1sk")?,
            attr("sweepPk")?,
            attr("lastSeenAt")?,
        ]))
        .key_schema(key_el("pk", KeyType::Hash)?)
        .key_schema(key_el("sk", KeyType::Range)?)
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(GSI1)
                .key_schema(key_el("gsi1pk", KeyType::Hash)?)
                .key_schema(key_el("gsi1sk", KeyType::Range)?)
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()?,
        )
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(SWEEP_INDEX)
                .key_schema(key_el("sweepPk", KeyType::Hash)?)
                .key_schema(key_el("lastSeenAt", KeyType::Range)?)
                .projection(Projection::builder().projection_type(ProjectionType::All).build())
                .build()?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()?,
        )
        .send()
        .await;
    let created = match created {
        Ok(_) => true,
        Err(err) if err.as_service_error().is_some_and(|e| e.is_resource_in_use_exception()) => false,
        Err(err) => return Err(anyhow::anyhow!("creating table {table}: {}", DisplayErrorContext(&err))),
    };

    let stream_arn = wait_until_active(client, table).await?;
    if created {
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(TimeToLiveSpecification::builder().enabled(true).attribute_name("ttl").build()?)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("enabling TTL on {table}: {}", DisplayErrorContext(&e)))
            .context("the table was created, but without TTL")?;
    }
    Ok(TableInfo { name: table.to_string(), stream_arn, created })
}

/// Waits for the table to be ACTIVE and returns its stream ARN.
pub async fn wait_until_active(client: &Client, table: &str) -> anyhow::Result<String> {
    for _ in 0..120 {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("describing table {table}: {}", DisplayErrorContext(&e)))?;
        let desc = out.table.ok_or_else(|| anyhow::anyhow!("table {table} has no description"))?;
        if desc.table_status == Some(TableStatus::Active) {
            return desc
                .latest_stream_arn
                .ok_or_else(|| anyhow::anyhow!("table {table} has no stream; Roomcast needs NEW_AND_OLD_IMAGES"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("table {table} did not become ACTIVE within a minute")
}

use super::*;

#[test]
fn a_rooms_present_users_share_one_sweep_shard_and_tombstones_have_none() {
    let now = Utc::now();
    let keyed = |user: &str, present: bool| {
        let mut p = Presence::new("acme", "lobby", user, now);
        if present {
            p.connections.insert(format!("c-{user}"));
        }
        let item = with_sweep_keys(serde_dynamo::to_item(&p).unwrap());
        match item.get("sweepPk") {
            Some(serde_dynamo::AttributeValue::S(key)) => Some(key.clone()),
            _ => None,
        }
    };
    let shards: BTreeSet<Option<String>> = (0..50).map(|i| keyed(&format!("u{i}"), true)).collect();
    assert_eq!(shards.len(), 1, "one room, one shard: its memberships are read once a sweep");
    assert!(shards.iter().all(|k| k.as_deref().is_some_and(|k| k.starts_with("SWEEP#P"))));
    assert_eq!(keyed("gone", false), None, "a tombstone is not in the index");
    let rooms: BTreeSet<String> = (0..64).map(|i| sweep_presence_pk(&presence_pk("acme", &format!("r{i}")))).collect();
    assert!(rooms.len() > 8, "rooms spread over the shards: {rooms:?}");
}

#[test]
fn a_message_writes_no_index_entry_and_one_written_with_one_still_reads() {
    let now = Utc::now();
    let message = Message::published("acme", "general", "ann", "hi".into(), now, 60);
    let item: serde_dynamo::Item = serde_dynamo::to_item(&message).unwrap();
    assert!(!item.contains_key("gsi1pk") && !item.contains_key("gsi1sk"), "{item:?}");
    let mut old = item.clone();
    old.insert("gsi1pk".into(), serde_dynamo::AttributeValue::S(user_gsi1pk("acme", "ann")));
    old.insert("gsi1sk".into(), serde_dynamo::AttributeValue::S("MSG#x".into()));
    let read: Message = serde_dynamo::from_item(old).unwrap();
    assert_eq!(read.id, message.id);
}

#[test]
fn names_reject_key_separators_and_bad_lengths() {
    assert!(Name::parse("room", "general").is_ok());
    assert!(Name::parse("room", "team-1.chat:ops_x").is_ok());
    let err = Name::parse("room", "a#b").unwrap_err();
    assert!(err.contains("'#'"), "{err}");
    assert!(Name::parse("room", "").is_err());
    assert!(Name::parse("room", &"x".repeat(65)).is_err());
    assert!(Name::parse("room", "caf\u{e9}").is_err());
}

#[test]
fn a_message_id_gives_its_sort_key_and_ids_of_one_millisecond_keep_their_order() {
    let at = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
    let ids: Vec<String> = (0..50).map(|_| message_id_at(at)).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "one millisecond, in order");
    for id in &ids {
        assert_eq!(message_sk_of_id(id), Some(message_sk(&at, id)));
    }
    assert_eq!(message_sk_of_id("not-a-uuid"), None);
    assert_eq!(message_sk_of_id(&uuid::Uuid::new_v4().to_string()), None);
}

#[test]
fn timestamps_are_fixed_width_and_sort_as_strings() {
    let a = Utc.timestamp_millis_opt(1_700_000_000_000).unwrap();
    let b = a + Duration::milliseconds(5);
    assert_eq!(format_ts(&a), "2023-11-14T22:13:20.000Z");
    assert!(message_sk(&a, "z") < message_sk(&b, "a"));
    assert_eq!(parse_ts(&format_ts(&b)).unwrap(), b);
}

#[test]
fn connection_round_trips_through_a_dynamodb_item_with_rooms_as_a_string_set() {
    let tenant = Name::parse("tenant", "acme").unwrap();
    let now = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
    let conn = Connection::new(NewConnection {
        connection_id: "abc=",
        tenant: &tenant,
        user_id: "u1",
        connection_type: Some("client".into()),
        deployment_id: None,
        rooms: ["general".to_string(), "ops".to_string()].into(),
        endpoint: "https://x/prod".into(),
        now,
        ttl_seconds: 60,
    });
    let item: serde_dynamo::Item = serde_dynamo::to_item(&conn).unwrap();
    assert!(matches!(item.get("rooms"), Some(serde_dynamo::AttributeValue::Ss(_))), "{item:?}");
    assert!(item.get("deploymentId").is_none());
    assert_eq!(item.get("ttl"), Some(&serde_dynamo::AttributeValue::N("1700000060".into())));
    let back: Connection = serde_dynamo::from_item(item).unwrap();
    assert_eq!(back, conn);

    let lonely = Connection { rooms: BTreeSet::new(), ..conn };
    let item: serde_dynamo::Item = serde_dynamo::to_item(&lonely).unwrap();
    assert!(item.get("rooms").is_none(), "DynamoDB rejects empty sets");
    assert_eq!(serde_dynamo::from_item::<_, Connection>(item).unwrap(), lonely);
}

#[test]
fn every_key_builder_makes_an_item_of_its_kind_with_its_tenant() {
    let now = Utc::now();
    let cases = [
        (connection_pk("c1"), CONNECTION_SK.to_string(), ItemKind::Connection, ""),
        (room_pk("acme", "lobby"), membership_sk("c1"), ItemKind::Membership, "acme"),
        (room_pk("acme", "lobby"), message_sk(&now, "m1"), ItemKind::Message, "acme"),
        (room_pk("acme", "lobby"), "SIG#s1".to_string(), ItemKind::Signal, "acme"),
        (user_message_pk("acme", "ann"), "MSG#m1".to_string(), ItemKind::UserMessage, "acme"),
        (presence_pk("acme", "lobby"), presence_sk("ann"), ItemKind::Presence, "acme"),
        (room_pk("acme", "lobby"), presence_sk("ann"), ItemKind::Presence, "acme"),
        (presence_pk("acme", "lobby"), ROOM_PRESENCE_SK.to_string(), ItemKind::RoomPresence, "acme"),
        (roster_pk("acme", "lobby"), ROSTER_VERSION_SK.to_string(), ItemKind::Roster, "acme"),
        (limit_pk("acme#conn#c1"), "W#1700000000".to_string(), ItemKind::Limit, "acme"),
        (SWEEPER_PK.to_string(), SWEEPER_LEASE_SK.to_string(), ItemKind::Sweeper, ""),
        (fanout_pk("ev-1"), FANOUT_PROGRESS_SK.to_string(), ItemKind::Fanout, ""),
        (idempotency_pk("acme", "publish", "k1"), IDEMPOTENCY_SK.to_string(), ItemKind::Idempotency, "acme"),
        (tenant_pk("acme"), SETTINGS_SK.to_string(), ItemKind::Settings, "acme"),
        (tenant_pk("acme"), IDENTITY_SK.to_string(), ItemKind::Identity, "acme"),
        (tenant_pk("acme"), PLUGIN_CONFIG_SK.to_string(), ItemKind::PluginConfig, "acme"),
        (tenant_pk("acme"), PLUGIN_ACTIVE_SK.to_string(), ItemKind::PluginActive, "acme"),
        (tenant_pk("acme"), plugin_meta_sk("1.0.0"), ItemKind::PluginMeta, "acme"),
        (tenant_pk("acme"), plugin_chunk_sk("1.0.0", 3), ItemKind::PluginChunk, "acme"),
        (tenant_pk("acme"), legacy_plugin_chunk_sk("1.0.0", 3), ItemKind::PluginChunk, "acme"),
    ];
    for (pk, sk, kind, tenant) in cases {
        assert_eq!(ItemKind::of(&pk, &sk), Some(kind), "{pk}/{sk}");
        assert_eq!(kind.tenant(&pk), tenant, "{pk}/{sk}");
    }
    let strangers = [
        ("CONN#c1", "OTHER"),
        ("ROOM#acme#lobby", "NOPE#1"),
        ("TENANT#acme", "PLUGIN#1.0.0"),
        ("X#1", "Y"),
        ("CONN", "META"),
        ("ROOM", "CONN#c1"),
        ("SWEEPER#1", "LEASE"),
    ];
    for (pk, sk) in strangers {
        assert_eq!(ItemKind::of(pk, sk), None, "{pk}/{sk}");
    }
}

//! API Gateway's documented requests, as the handlers receive them.

use super::*;

pub const CONNECT_FIXTURE: &str = include_str!("../fixtures/example-apigw-websocket-request.json");
pub const DISCONNECT_FIXTURE: &str = include_str!("../fixtures/example-apigw-websocket-request-disconnect-route.json");
pub const DYNAMODB_EVENT_FIXTURE: &str = include_str!("../fixtures/example-dynamodb-event.json");

/// The AWS example WebSocket request, as `$connect` with our authorizer's context.
pub fn connect_request(connection_id: &str, tenant: &str, user: &str, rooms: &str) -> ApiGatewayWebsocketProxyRequest {
    let mut v: Value = serde_json::from_str(CONNECT_FIXTURE).unwrap();
    v["requestContext"]["connectionId"] = json!(connection_id);
    v["requestContext"]["routeKey"] = json!("$connect");
    v["requestContext"]["eventType"] = json!("CONNECT");
    v["requestContext"]["domainName"] = json!("abcd1234.execute-api.us-east-1.amazonaws.com");
    v["requestContext"]["stage"] = json!("prod");
    v["requestContext"]["authorizer"] =
        json!({"principalId": user, "tenant": tenant, "userId": user, "integrationLatency": 12});
    v["queryStringParameters"] = json!({"rooms": rooms, "deployment_id": "deploy-1", "connection_type": "client"});
    v["multiValueQueryStringParameters"] =
        json!({"rooms": [rooms], "deployment_id": ["deploy-1"], "connection_type": ["client"]});
    v["body"] = Value::Null;
    serde_json::from_value(v).unwrap()
}

/// Query string parameters as API Gateway passes them.
pub fn query(pairs: &[(&str, &str)]) -> aws_lambda_events::query_map::QueryMap {
    let map: std::collections::HashMap<String, Vec<String>> =
        pairs.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect();
    map.into()
}

/// The AWS example WebSocket request, as a message frame from `connection_id`.
pub fn message_request(connection_id: &str, body: &str) -> ApiGatewayWebsocketProxyRequest {
    let mut v: Value = serde_json::from_str(CONNECT_FIXTURE).unwrap();
    v["requestContext"]["connectionId"] = json!(connection_id);
    v["requestContext"]["routeKey"] = json!("$default");
    v["requestContext"]["eventType"] = json!("MESSAGE");
    v["requestContext"]["authorizer"] = Value::Null;
    v["body"] = json!(body);
    serde_json::from_value(v).unwrap()
}

/// The AWS example `$disconnect` request for `connection_id`.
pub fn disconnect_request(connection_id: &str) -> ApiGatewayWebsocketProxyRequest {
    let mut v: Value = serde_json::from_str(DISCONNECT_FIXTURE).unwrap();
    v["requestContext"]["connectionId"] = json!(connection_id);
    serde_json::from_value(v).unwrap()
}

pub fn body_json(response: &ApiGatewayProxyResponse) -> Value {
    match &response.body {
        Some(aws_lambda_events::encodings::Body::Text(t)) => {
            serde_json::from_str(t).unwrap_or(Value::String(t.clone()))
        }
        other => panic!("expected a text body, got {other:?}"),
    }
}

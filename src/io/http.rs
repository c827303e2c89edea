//! The HTTP API (axum): commands are validated, published to
//! `campaign-commands` and answered 202; queries read the sled read models;
//! `/metrics`, `/healthz` and `/readyz` for operators. Every error is JSON
//! `{"error": ...}` naming the field at fault.

use crate::actors::SharedCtx;
use crate::domain::campaign::{
    check_transition, parse_budget, parse_create, parse_simple, valid_id, CampaignState, Command,
    CommandKind, FieldError,
};
use crate::domain::filter::{Filter, FilterError};
use crate::domain::model::{ModelCommand, ModelCommandKind};
use crate::domain::reaction::Action;
use crate::domain::window::WindowKind;
use crate::io::OutRecord;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use std::collections::BTreeMap;

#[derive(Clone)]
struct App {
    ctx: SharedCtx,
    metrics: PrometheusHandle,
}

/// An API error: status and message.
struct ApiError(StatusCode, Value);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let class = match self.0.as_u16() {
            400..=499 => "4xx",
            _ => "5xx",
        };
        metrics::counter!("smartmsg_http_requests_total", "status" => class).increment(1);
        (self.0, Json(self.1)).into_response()
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError(status, json!({ "error": msg.into() }))
}

fn bad_field(e: crate::domain::campaign::FieldError) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        json!({ "error": e.to_string(), "field": e.field }),
    )
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "request failed");
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("temporarily unavailable: {e}"),
    )
}

type ApiResult = Result<Response, ApiError>;

fn ok(status: StatusCode, v: Value) -> ApiResult {
    metrics::counter!("smartmsg_http_requests_total", "status" => "2xx").increment(1);
    Ok((status, Json(v)).into_response())
}

fn gen_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body: larger than http.max_body_bytes",
            )
        } else {
            err(r.status(), format!("body: {}", r.body_text()))
        }
    })
}

fn parse_json(bytes: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            json!({ "error": format!("body: malformed JSON: {e}"), "field": "body" }),
        )
    })
}

/// A body that may be left out (empty or blank), else JSON.
fn optional_json(body: Result<Bytes, BytesRejection>) -> Result<Option<Value>, ApiError> {
    let bytes = body_bytes(body)?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Ok(None)
    } else {
        parse_json(&bytes).map(Some)
    }
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = &app.ctx.cfg.http.auth_token;
    if token.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) {
        Ok(())
    } else {
        Err(err(
            StatusCode::UNAUTHORIZED,
            "authorization: bearer token required",
        ))
    }
}

/// Publish a validated command, after the idempotency and status checks.
async fn submit(app: &App, cmd: Command, include_campaign: bool) -> ApiResult {
    let ctx = &app.ctx;
    let answer = |cmd: &Command| {
        if include_campaign {
            json!({"command_id": cmd.command_id, "campaign_id": cmd.campaign_id})
        } else {
            json!({"command_id": cmd.command_id})
        }
    };
    // A repeated command id is answered with the first outcome.
    if let Some(known) = ctx.read_model.command(&cmd.command_id).map_err(internal)? {
        let mut v = answer(&cmd);
        v["campaign_id"] = json!(known.campaign_id);
        return ok(StatusCode::ACCEPTED, v);
    }
    let status = ctx
        .read_model
        .campaign(&cmd.campaign_id)
        .map_err(internal)?
        .and_then(|c| c.status);
    if status.is_none() && !matches!(cmd.kind, CommandKind::Create { .. }) {
        return Err(err(
            StatusCode::NOT_FOUND,
            format!("campaign {} is unknown", cmd.campaign_id),
        ));
    }
    if let Err(reason) = check_transition(status, &cmd.kind) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            json!({"error": reason, "command_id": cmd.command_id, "campaign_id": cmd.campaign_id}),
        ));
    }
    let value = serde_json::to_vec(&cmd).expect("serialisable");
    ctx.log
        .publish(vec![OutRecord::keyed(
            &ctx.topics.commands,
            cmd.campaign_id.clone(),
            Some(value),
        )])
        .await
        .map_err(internal)?;
    ctx.read_model
        .put_pending(&cmd.command_id, &cmd.campaign_id)
        .map_err(internal)?;
    ok(StatusCode::ACCEPTED, answer(&cmd))
}

async fn create_campaign(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers)?;
    let v = parse_json(&body_bytes(body)?)?;
    let cmd = parse_create(&v, gen_id).map_err(bad_field)?;
    submit(&app, cmd, true).await
}

async fn simple_command(
    app: App,
    headers: HeaderMap,
    id: String,
    body: Result<Bytes, BytesRejection>,
    kind: CommandKind,
) -> ApiResult {
    authorize(&app, &headers)?;
    let v = optional_json(body)?;
    let cmd = parse_simple(v.as_ref(), &id, kind, gen_id).map_err(bad_field)?;
    submit(&app, cmd, false).await
}

async fn pause(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    simple_command(app, headers, id, body, CommandKind::Pause).await
}

async fn resume(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    simple_command(app, headers, id, body, CommandKind::Resume).await
}

async fn cancel(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    simple_command(app, headers, id, body, CommandKind::Cancel).await
}

async fn set_budget(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers)?;
    let v = parse_json(&body_bytes(body)?)?;
    let cmd = parse_budget(&v, &id, gen_id).map_err(bad_field)?;
    submit(&app, cmd, false).await
}

/// The contract's campaign shape.
pub fn campaign_json(c: &CampaignState) -> Value {
    json!({
        "campaign_id": c.campaign_id,
        "channel_id": c.channel_id,
        "status": c.status.map(|s| s.as_str()).unwrap_or("unknown"),
        "budget": c.budget,
        "creatives": c.creatives,
        "start_at": c.start_at,
        "end_at": c.end_at,
        "batch_interval_secs": c.batch_interval_secs,
        "batches_total": c.batches_total,
        "batches_done": c.batches_done,
        "messages_sent": c.messages_sent,
        "model_version": c.model_version,
        "next_batch_due_at": c.pending.as_ref().map(|p| p.due_at),
    })
}

async fn list_campaigns(State(app): State<App>) -> ApiResult {
    let all = app.ctx.read_model.campaigns().map_err(internal)?;
    let list: Vec<Value> = all
        .iter()
        .filter(|c| c.exists())
        .map(campaign_json)
        .collect();
    ok(StatusCode::OK, json!({ "campaigns": list }))
}

fn known_campaign(app: &App, id: &str) -> Result<CampaignState, ApiError> {
    valid_id("campaign_id", id).map_err(bad_field)?;
    app.ctx
        .read_model
        .campaign(id)
        .map_err(internal)?
        .filter(|c| c.exists())
        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("campaign {id} is unknown")))
}

async fn get_campaign(State(app): State<App>, Path(id): Path<String>) -> ApiResult {
    let c = known_campaign(&app, &id)?;
    ok(StatusCode::OK, campaign_json(&c))
}

/// Build the report of a campaign from its read model and final windows.
pub fn report_json(ctx: &SharedCtx, c: &CampaignState) -> Result<Value, crate::io::IoError> {
    let windows = ctx.reports.windows(&c.campaign_id)?;
    let mut totals: BTreeMap<(String, Action), u64> = BTreeMap::new();
    let mut series: BTreeMap<(i64, String, Action), u64> = BTreeMap::new();
    for w in windows
        .iter()
        .filter(|w| w.window == WindowKind::Tumbling1m)
    {
        *totals.entry((w.creative_id.clone(), w.action)).or_default() += w.count;
        *series
            .entry((w.window_start, w.creative_id.clone(), w.action))
            .or_default() += w.count;
    }
    let creatives: Vec<Value> = c
        .creatives
        .iter()
        .map(|cr| {
            let sends = c.sends_per_creative.get(&cr.creative_id).copied().unwrap_or(0);
            let impressions = totals.get(&(cr.creative_id.clone(), Action::Impression)).copied().unwrap_or(0);
            let clicks = totals.get(&(cr.creative_id.clone(), Action::Click)).copied().unwrap_or(0);
            let ctr = if sends > 0 { clicks as f64 / sends as f64 } else { 0.0 };
            json!({"creative_id": cr.creative_id, "sends": sends, "impressions": impressions, "clicks": clicks, "ctr": ctr})
        })
        .collect();
    let series: Vec<Value> = series
        .into_iter()
        .map(|((start, creative, action), count)| {
            json!({"window_start": start, "creative_id": creative, "action": action.as_str(), "count": count})
        })
        .collect();
    Ok(json!({"campaign_id": c.campaign_id, "creatives": creatives, "series": series}))
}

async fn get_report(State(app): State<App>, Path(id): Path<String>) -> ApiResult {
    let c = known_campaign(&app, &id)?;
    let v = report_json(&app.ctx, &c).map_err(internal)?;
    ok(StatusCode::OK, v)
}

async fn get_command(State(app): State<App>, Path(id): Path<String>) -> ApiResult {
    valid_id("command_id", &id).map_err(bad_field)?;
    match app.ctx.read_model.command(&id).map_err(internal)? {
        Some(c) => ok(
            StatusCode::OK,
            json!({"command_id": c.command_id, "campaign_id": c.campaign_id, "status": c.status, "reason": c.reason}),
        ),
        None => Err(err(
            StatusCode::NOT_FOUND,
            format!("command {id} is unknown"),
        )),
    }
}

/// Validate an NDJSON subscriber body: every line or a 400 naming the first bad one.
pub fn parse_subscribers(
    channel: &str,
    body: &[u8],
) -> Result<Vec<(String, Value)>, (String, String)> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ("body".to_string(), "body: not UTF-8".to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            (
                format!("line {n}"),
                format!("line {n}: malformed JSON: {e}"),
            )
        })?;
        let obj = v.as_object().ok_or_else(|| {
            (
                format!("line {n}"),
                format!("line {n}: must be a JSON object"),
            )
        })?;
        let user = match obj.get("user_id") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err((
                    "user_id".into(),
                    format!("line {n}: user_id: is required (a string)"),
                ))
            }
        };
        valid_id("user_id", &user)
            .map_err(|e| ("user_id".to_string(), format!("line {n}: {e}")))?;
        if user.contains('/') {
            return Err((
                "user_id".into(),
                format!("line {n}: user_id: must not contain '/'"),
            ));
        }
        let features = match obj.get("features") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(f)) => f.clone(),
            Some(_) => {
                return Err((
                    "features".into(),
                    format!("line {n}: features: must be an object"),
                ))
            }
        };
        for (k, fv) in &features {
            if !fv.is_number() {
                return Err((
                    format!("features.{k}"),
                    format!("line {n}: features.{k}: must be a number"),
                ));
            }
        }
        out.push((
            user.clone(),
            json!({"channel_id": channel, "user_id": user, "features": features}),
        ));
    }
    Ok(out)
}

async fn put_subscribers(
    State(app): State<App>,
    headers: HeaderMap,
    Path(channel): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers)?;
    valid_id("channel_id", &channel).map_err(bad_field)?;
    if channel.contains('/') {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            json!({"error": "channel_id: must not contain '/'", "field": "channel_id"}),
        ));
    }
    let bytes = body_bytes(body)?;
    let subs = parse_subscribers(&channel, &bytes).map_err(|(field, msg)| {
        ApiError(
            StatusCode::BAD_REQUEST,
            json!({"error": msg, "field": field}),
        )
    })?;
    let count = subs.len();
    let topic = app.ctx.topics.subscribers.clone();
    for chunk in subs.chunks(10_000) {
        let records = chunk
            .iter()
            .map(|(user, v)| {
                OutRecord::keyed(
                    &topic,
                    format!("{channel}/{user}"),
                    Some(serde_json::to_vec(v).expect("serialisable")),
                )
            })
            .collect();
        app.ctx.log.publish(records).await.map_err(internal)?;
    }
    ok(StatusCode::ACCEPTED, json!({ "count": count }))
}

async fn get_model(State(app): State<App>) -> ApiResult {
    let m = app.ctx.model.load();
    ok(
        StatusCode::OK,
        json!({"version": m.version, "trained_at": m.trained_at, "examples": m.examples,
            "metrics": m.metrics, "restored_from": m.restored_from,
            "training_held": m.restored_from.is_some()}),
    )
}

async fn model_rollback(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    model_command(app, headers, body, ModelCommandKind::Rollback).await
}

async fn model_resume(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    model_command(app, headers, body, ModelCommandKind::Resume).await
}

/// A rollback or resume for the trainer, made against this node's current
/// model (an optional body may name it: `from_version`, and `command_id`).
/// Checked here against that model, applied by the trainer only if no
/// newer version appeared meanwhile; answered 202.
async fn model_command(
    app: App,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: ModelCommandKind,
) -> ApiResult {
    authorize(&app, &headers)?;
    let v = optional_json(body)?;
    let current = app.ctx.model.load_full();
    let mut command_id = None;
    if let Some(v) = &v {
        let obj = v.as_object().ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                json!({"error": "body: must be a JSON object", "field": "body"}),
            )
        })?;
        if let Some(id) = obj.get("command_id") {
            let id = id.as_str().ok_or_else(|| {
                bad_field(FieldError {
                    field: "command_id".into(),
                    message: "must be a string".into(),
                })
            })?;
            valid_id("command_id", id).map_err(bad_field)?;
            command_id = Some(id.to_string());
        }
        if let Some(f) = obj.get("from_version") {
            let f = f.as_u64().ok_or_else(|| {
                bad_field(FieldError {
                    field: "from_version".into(),
                    message: "must be an integer >= 0".into(),
                })
            })?;
            if f != current.version {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    json!({"error": format!("from_version: the current model version is {}", current.version),
                        "field": "from_version", "version": current.version}),
                ));
            }
        }
    }
    let refusal = match kind {
        ModelCommandKind::Rollback if current.rollback_source().is_none() => {
            Some("no earlier model version to go back to")
        }
        ModelCommandKind::Resume if current.restored_from.is_none() => {
            Some("training is not held by a rollback")
        }
        _ => None,
    };
    if let Some(r) = refusal {
        return Err(ApiError(
            StatusCode::CONFLICT,
            json!({"error": r, "version": current.version}),
        ));
    }
    let cmd = ModelCommand {
        command_id: command_id.unwrap_or_else(gen_id),
        kind,
        from_version: current.version,
        ts: app.ctx.clock.now_ms(),
    };
    // One key: the requests stay in order on one partition.
    let record = OutRecord::keyed(
        &app.ctx.topics.model_commands,
        "model",
        Some(serde_json::to_vec(&cmd).expect("serialisable")),
    );
    app.ctx.log.publish(vec![record]).await.map_err(internal)?;
    ok(
        StatusCode::ACCEPTED,
        json!({"command_id": cmd.command_id, "from_version": cmd.from_version}),
    )
}

/// How long a filter change waits to be applied on this node (so that the
/// writer's next request here sees it).
const FILTER_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn bad_filter(e: FilterError) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        json!({ "error": e.to_string(), "field": e.field }),
    )
}

/// Write a filter change to the `filters` topic, then wait until this
/// node has applied it.
async fn write_filter(app: &App, id: &str, value: Option<Vec<u8>>) -> Result<(), ApiError> {
    let ctx = &app.ctx;
    let written = ctx
        .log
        .publish(vec![OutRecord::keyed(
            &ctx.topics.filters,
            id.to_string(),
            value,
        )])
        .await
        .map_err(internal)?;
    let w = written
        .first()
        .ok_or_else(|| internal("the filter write was not acknowledged"))?;
    if ctx
        .filters
        .wait_applied(w.partition, w.offset, FILTER_APPLY_WAIT)
        .await
    {
        Ok(())
    } else {
        Err(internal(
            "the filter was written but this node has not applied it yet (node.roles needs materializer)",
        ))
    }
}

async fn put_filter(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers)?;
    let mut v = parse_json(&body_bytes(body)?)?;
    if let Some(o) = v.as_object_mut() {
        o.entry("filter_id")
            .or_insert_with(|| Value::String(gen_id()));
    }
    let filter = Filter::parse(&v).map_err(bad_filter)?;
    let existed = app.ctx.filters.index().get(&filter.filter_id).is_some();
    let bytes = serde_json::to_vec(&filter.to_json()).expect("serialisable");
    write_filter(&app, &filter.filter_id, Some(bytes)).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    ok(status, json!({ "filter_id": filter.filter_id }))
}

async fn list_filters(State(app): State<App>) -> ApiResult {
    let index = app.ctx.filters.index();
    let filters: Vec<Value> = index.filters().iter().map(Filter::to_json).collect();
    ok(StatusCode::OK, json!({ "filters": filters }))
}

async fn delete_filter(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authorize(&app, &headers)?;
    if app.ctx.filters.index().get(&id).is_none() {
        return Err(err(StatusCode::NOT_FOUND, format!("filter {id} not found")));
    }
    write_filter(&app, &id, None).await?;
    metrics::counter!("smartmsg_http_requests_total", "status" => "2xx").increment(1);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn classify(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    authorize(&app, &headers)?;
    let v = parse_json(&body_bytes(body)?)?;
    let Some(fields) = v.get("fields").and_then(Value::as_object) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            json!({"error": "fields: must be an object", "field": "fields"}),
        ));
    };
    let ids = app.ctx.filters.index().classify(fields);
    ok(StatusCode::OK, json!({ "filter_ids": ids }))
}

async fn metrics_text(State(app): State<App>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

async fn readyz(State(app): State<App>) -> Response {
    let ctx = &app.ctx;
    let mut problems = Vec::new();
    if let Err(e) = ctx.log.healthcheck().await {
        problems.push(format!("event log: {e}"));
    }
    if let Some(q) = &ctx.queue {
        if let Err(e) = q.healthcheck().await {
            problems.push(format!("delay queue: {e}"));
        }
    }
    if !ctx.readiness.is_ready() {
        problems.push("partitions restoring or node starting".to_string());
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "problems": problems})),
        )
            .into_response()
    }
}

async fn not_found() -> ApiError {
    err(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The API router.
pub fn router(ctx: SharedCtx, metrics: PrometheusHandle) -> Router {
    let limit = ctx.cfg.http.max_body_bytes as usize;
    let app = App { ctx, metrics };
    Router::new()
        .route("/v1/campaigns", post(create_campaign).get(list_campaigns))
        .route("/v1/campaigns/{id}", get(get_campaign))
        .route("/v1/campaigns/{id}/pause", post(pause))
        .route("/v1/campaigns/{id}/resume", post(resume))
        .route("/v1/campaigns/{id}/cancel", post(cancel))
        .route("/v1/campaigns/{id}/budget", put(set_budget))
        .route("/v1/campaigns/{id}/report", get(get_report))
        .route("/v1/commands/{id}", get(get_command))
        .route("/v1/channels/{id}/subscribers", put(put_subscribers))
        .route("/v1/model", get(get_model))
        .route("/v1/model/rollback", post(model_rollback))
        .route("/v1/model/resume", post(model_resume))
        .route("/v1/filters", post(put_filter).get(list_filters))
        .route("/v1/filters/{id}", axum::routing::delete(delete_filter))
        .route("/v1/classify", post(classify))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

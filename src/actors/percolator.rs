//! `PercolatorActor`: owns one partition of `contents`. Each document
//! (`{"document_id","fields":{...}}`) is classified against the node's
//! filter index; a document that matches at least one filter yields
//! `{"document_id","filter_ids","ts"}` on `content-matches` (key
//! `document_id`), and an unreadable one a dead letter on `contents.dlq`.
//! Output and input offsets go in one transaction, so a document is
//! answered once; re-classifying after a crash rewrites the same identity
//! (`document_id`). Before its first document the actor waits until the
//! node has applied every filter written so far.

use crate::actors::{SharedCtx, POLL_WAIT};
use crate::io::{GroupMember, OffsetCommit, OutRecord, PartitionReader, Record, Txn, TxnWriter};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for the filters to be applied before classifying.
const FILTERS_WAIT: Duration = Duration::from_secs(60);

pub struct PercolatorActor;

pub struct PercolatorArgs {
    pub ctx: SharedCtx,
    pub partition: u32,
    pub member: Arc<dyn GroupMember>,
}

pub enum PercolatorMsg {
    Poll,
}

pub struct PercolatorState {
    ctx: SharedCtx,
    partition: u32,
    writer: Arc<dyn TxnWriter>,
    reader: Box<dyn PartitionReader>,
}

/// The match record of a document, `None` when it matches nothing; `Err`
/// with the reason when the record is unreadable.
pub fn classify_record(
    ctx: &SharedCtx,
    value: Option<&[u8]>,
    now_ms: i64,
) -> Result<Option<(String, Vec<u8>)>, String> {
    let bytes = value.ok_or("invalid: null value")?;
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("malformed: {e}"))?;
    let id = match v.get("document_id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
        _ => return Err("invalid: document_id must be a string of 1 to 128 bytes".into()),
    };
    let fields = v
        .get("fields")
        .and_then(Value::as_object)
        .ok_or("invalid: fields must be an object")?;
    let ids = ctx.filters.index().classify(fields);
    if ids.is_empty() {
        return Ok(None);
    }
    let out = json!({"document_id": id, "filter_ids": ids, "ts": now_ms});
    Ok(Some((id, serde_json::to_vec(&out).expect("serialisable"))))
}

impl PercolatorState {
    async fn process(&self, records: Vec<Record>) -> Result<(), ActorProcessingErr> {
        let Some(last) = records.last().map(|r| r.offset) else {
            return Ok(());
        };
        let now = self.ctx.clock.now_ms();
        let t = &self.ctx.topics;
        let mut out = Vec::new();
        let mut matched = 0u64;
        for r in &records {
            match classify_record(&self.ctx, r.value.as_deref(), now) {
                Ok(Some((id, value))) => {
                    matched += 1;
                    out.push(OutRecord::keyed(&t.content_matches, id, Some(value)));
                }
                Ok(None) => {}
                Err(reason) => {
                    let class = reason.split(':').next().unwrap_or("invalid").to_string();
                    metrics::counter!("smartmsg_dlq_records_total", "reason" => class).increment(1);
                    tracing::warn!(partition = self.partition, offset = r.offset, %reason,
                        "content record dead-lettered");
                    out.push(crate::io::dead_letter(
                        &t.contents_dlq,
                        &t.contents,
                        self.partition,
                        r.offset,
                        r.key.as_deref(),
                        r.value.as_deref(),
                        &reason,
                    ));
                }
            }
        }
        self.writer
            .commit(Txn {
                records: out,
                offsets: vec![OffsetCommit {
                    group: self.ctx.group().to_string(),
                    topic: t.contents.clone(),
                    partition: self.partition,
                    next_offset: last + 1,
                }],
            })
            .await?;
        metrics::counter!("smartmsg_documents_classified_total").increment(records.len() as u64);
        metrics::counter!("smartmsg_documents_matched_total").increment(matched);
        Ok(())
    }
}

impl Actor for PercolatorActor {
    type Msg = PercolatorMsg;
    type State = PercolatorState;
    type Arguments = PercolatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PercolatorArgs,
    ) -> Result<PercolatorState, ActorProcessingErr> {
        let ctx = args.ctx;
        let p = args.partition;
        // Classify against every filter written before we start, not the
        // part of them this node happens to have applied (partitions that
        // start together share one read of where the filters end).
        let t = &ctx.topics;
        if !ctx
            .filters
            .wait_current(ctx.log.as_ref(), &t.filters, t.partitions, FILTERS_WAIT)
            .await?
        {
            return Err(format!("the filters were not applied within {FILTERS_WAIT:?}").into());
        }
        let writer = args.member.writer();
        let from = args.member.committed(p).await?.unwrap_or(0);
        let reader = args.member.reader(p, from).await?;
        tracing::info!(
            partition = p,
            from,
            filters = ctx.filters.index().len(),
            "percolator partition started"
        );
        myself.send_message(PercolatorMsg::Poll)?;
        Ok(PercolatorState {
            ctx,
            partition: p,
            writer,
            reader,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _msg: PercolatorMsg,
        state: &mut PercolatorState,
    ) -> Result<(), ActorProcessingErr> {
        let records = state.reader.next_batch(2000, POLL_WAIT).await?;
        state.process(records).await?;
        myself.send_message(PercolatorMsg::Poll)?;
        Ok(())
    }
}

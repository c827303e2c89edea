//! The Kafka adapter against a real Kafka-protocol broker (Tansu): topics,
//! publishing, read_committed readers to EOF, transactions with group
//! offsets, zombie fencing and rebalances of a consumer group.

mod common;

use common::tansu::Tansu;
use common::{first_assignment, read_all};
use smartmsg::config::Compression;
use smartmsg::io::kafka::{KafkaLog, KafkaSettings};
use smartmsg::io::{EventLog, IoError, OffsetCommit, OutRecord, PartitionEvent, TopicSpec, Txn};
use std::time::Duration;

fn settings(t: &Tansu, id: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: t.brokers(),
        session_timeout_ms: 6000,
        replication_factor: 1,
        compression: Compression::Lz4,
        client_id: id.into(),
    }
}

fn spec(name: &str, partitions: u32) -> TopicSpec {
    TopicSpec {
        name: name.into(),
        partitions,
        compacted: false,
        max_message_bytes: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_publish_and_read_to_the_end() {
    let t = Tansu::start();
    let log = KafkaLog::connect(settings(&t, "a")).await.unwrap();
    log.ensure_topic(&spec("t1", 4)).await.unwrap();
    log.ensure_topic(&spec("t1", 4)).await.unwrap();
    assert_eq!(log.partitions("t1"), Some(4));
    assert!(matches!(
        log.ensure_topic(&spec("t1", 2)).await,
        Err(IoError::Fatal(_))
    ));
    let recs: Vec<OutRecord> = (0..100)
        .map(|i| {
            OutRecord::keyed(
                "t1",
                format!("k{}", i % 10),
                Some(format!("v{i}").into_bytes()),
            )
        })
        .collect();
    let w = log.publish(recs).await.unwrap();
    // Same key, same partition (murmur2), as the embedded log decides.
    assert_eq!(
        w[0].partition,
        smartmsg::domain::partition::partition_for(b"k0", 4)
    );
    assert_eq!(w[0].partition, w[10].partition);
    let all = read_all(&log, "t1", 4).await;
    assert_eq!(all.len(), 100);
    let mut one = log.reader("t1", w[0].partition, 0);
    let first = one.next_batch(1000, Duration::ZERO).await.unwrap();
    assert!(first.iter().all(|r| r.partition == w[0].partition));
    assert!(!first.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_records_and_group_offsets_and_fence_zombies() {
    let t = Tansu::start();
    let log = KafkaLog::connect(settings(&t, "b")).await.unwrap();
    log.ensure_topic(&spec("in", 2)).await.unwrap();
    log.ensure_topic(&spec("out", 2)).await.unwrap();
    log.publish(
        (0..10)
            .map(|i| OutRecord::keyed("in", format!("k{i}"), Some(vec![1])))
            .collect(),
    )
    .await
    .unwrap();
    let member = log.join_group("g1", "in", "txn-g1-a").await.unwrap();
    assert_eq!(first_assignment(member.as_ref()).await, vec![0, 1]);
    let p = 0;
    let from = member.committed(p).await.unwrap().unwrap_or(0);
    assert_eq!(from, 0);
    let mut reader = member.reader(p, from).await.unwrap();
    let got = reader
        .next_batch(100, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!got.is_empty());
    let next = got.last().unwrap().offset + 1;
    let w = member
        .writer()
        .commit(Txn {
            records: vec![OutRecord::keyed("out", "x", Some(b"committed".to_vec()))],
            offsets: vec![OffsetCommit {
                group: "g1".into(),
                topic: "in".into(),
                partition: p,
                next_offset: next,
            }],
        })
        .await
        .unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(member.committed(p).await.unwrap(), Some(next));
    let out = read_all(&log, "out", 2).await;
    assert_eq!(out.len(), 1);

    // Zombie fencing: a newer writer with the same transactional id.
    let old = log.txn_writer("fence-me").await.unwrap();
    old.commit(Txn {
        records: vec![OutRecord::keyed("out", "o", Some(b"1".to_vec()))],
        offsets: vec![],
    })
    .await
    .unwrap();
    let new = log.txn_writer("fence-me").await.unwrap();
    new.commit(Txn {
        records: vec![OutRecord::keyed("out", "n", Some(b"2".to_vec()))],
        offsets: vec![],
    })
    .await
    .unwrap();
    let res = old
        .commit(Txn {
            records: vec![OutRecord::keyed("out", "o", Some(b"3".to_vec()))],
            offsets: vec![],
        })
        .await;
    assert!(
        matches!(res, Err(IoError::Fenced(_)) | Err(IoError::Fatal(_))),
        "{res:?}"
    );
    // And it stays stopped: never retried forever.
    let again = old
        .commit(Txn {
            records: vec![OutRecord::keyed("out", "o", Some(b"4".to_vec()))],
            offsets: vec![],
        })
        .await;
    assert!(again.is_err());
    member.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_takes_partitions_after_a_drained_revoke() {
    let t = Tansu::start();
    let log = KafkaLog::connect(settings(&t, "c")).await.unwrap();
    log.ensure_topic(&spec("rb", 4)).await.unwrap();
    let a = log.join_group("g2", "rb", "txn-g2-a").await.unwrap();
    assert_eq!(first_assignment(a.as_ref()).await, vec![0, 1, 2, 3]);
    let mut readers = Vec::new();
    for p in 0..4 {
        readers.push(a.reader(p, 0).await.unwrap());
    }
    let log_b = KafkaLog::connect(settings(&t, "d")).await.unwrap();
    let b = log_b.join_group("g2", "rb", "txn-g2-b").await.unwrap();
    // a is asked to give partitions back and acknowledges after "draining".
    let ev = tokio::time::timeout(Duration::from_secs(30), a.next_event())
        .await
        .unwrap()
        .unwrap();
    match ev {
        PartitionEvent::Revoked { partitions, done } => {
            assert!(!partitions.is_empty());
            done.send(()).unwrap();
            // A reader of a partition given up says so (its actor stops).
            let p = partitions[0];
            let mut gone = false;
            for _ in 0..100 {
                match readers[p as usize]
                    .next_batch(10, Duration::from_millis(50))
                    .await
                {
                    Err(IoError::Retryable(e)) if e.contains("no longer owned") => {
                        gone = true;
                        break;
                    }
                    Err(e) => panic!("{e}"),
                    Ok(_) => {}
                }
            }
            assert!(gone, "the reader of revoked partition {p} still reads");
        }
        other => panic!("expected a revoke, got {other:?}"),
    }
    let mut a_now = Vec::new();
    let mut b_now = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while a_now.len() + b_now.len() < 4 {
        tokio::select! {
            Some(e) = a.next_event() => if let PartitionEvent::Assigned(p) = e { a_now.extend(p) },
            Some(e) = b.next_event() => if let PartitionEvent::Assigned(p) = e { b_now.extend(p) },
            _ = tokio::time::sleep_until(deadline) => panic!("rebalance incomplete: a {a_now:?} b {b_now:?}"),
        }
    }
    assert!(!b_now.is_empty(), "the new member owns partitions");
    let mut all: Vec<u32> = a_now.iter().chain(b_now.iter()).copied().collect();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3], "each partition owned once");
    b.leave().await;
    a.leave().await;
}

/// Read a group reader until `n` records came (or 20 s passed).
async fn read_n(reader: &mut Box<dyn smartmsg::io::PartitionReader>, n: usize) -> Vec<u64> {
    let mut offsets = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while offsets.len() < n && tokio::time::Instant::now() < deadline {
        reader
            .visit_batch(7, Duration::from_millis(200), &mut |r| {
                offsets.push(r.offset)
            })
            .await
            .unwrap();
    }
    offsets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_reader_of_an_owned_partition_starts_where_asked() {
    let t = Tansu::start();
    let log = KafkaLog::connect(settings(&t, "e")).await.unwrap();
    log.ensure_topic(&spec("rr", 1)).await.unwrap();
    let publish = |from: u32, to: u32| {
        (from..to)
            .map(|i| OutRecord::keyed("rr", format!("k{i}"), Some(format!("v{i}").into_bytes())))
            .map(|r| r.to_partition(0))
            .collect::<Vec<_>>()
    };
    log.publish(publish(0, 50)).await.unwrap();
    let member = log.join_group("g3", "rr", "txn-g3-a").await.unwrap();
    assert_eq!(first_assignment(member.as_ref()).await, vec![0]);

    // The first reader reads everything, in order, lending the bytes.
    let mut first = member.reader(0, 0).await.unwrap();
    let got = first.next_batch(20, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got[0].offset, 0);
    assert_eq!(got[0].value.as_deref(), Some(&b"v0"[..]));
    let mut offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    offsets.extend(read_n(&mut first, 50 - offsets.len()).await);
    assert_eq!(offsets, (0..50).collect::<Vec<u64>>());
    drop(first);

    // A restarted reader asked to start behind where its predecessor
    // stopped gets the records again from there (a seek), then the end.
    let mut second = member.reader(0, 10).await.unwrap();
    assert_eq!(
        read_n(&mut second, 40).await,
        (10..50).collect::<Vec<u64>>()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !second.at_end() && tokio::time::Instant::now() < deadline {
        let none = second
            .next_batch(10, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(none.is_empty(), "nothing beyond the end: {none:?}");
    }
    assert!(
        second.at_end(),
        "the end of the partition is reported after a seek"
    );
    drop(second);

    // A reader at the end waits for new records and gets exactly those.
    let mut third = member.reader(0, 50).await.unwrap();
    assert!(third
        .next_batch(10, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    log.publish(publish(50, 55)).await.unwrap();
    assert_eq!(read_n(&mut third, 5).await, (50..55).collect::<Vec<u64>>());
    assert_eq!(third.position(), 55);
    member.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_reader_reads_through_the_offset_gaps_of_transactional_input() {
    // Each committed transaction leaves a control record (a commit marker)
    // in the partition: the offsets readers see have gaps, which are part
    // of the log, not records lost on the way.
    let t = Tansu::start();
    let log = KafkaLog::connect(settings(&t, "f")).await.unwrap();
    log.ensure_topic(&spec("tx-in", 1)).await.unwrap();
    let writer = log.txn_writer("tx-in-writer").await.unwrap();
    let mut written = Vec::new();
    for txn in 0..5u32 {
        let w = writer
            .commit(Txn {
                records: (0..4)
                    .map(|i| {
                        OutRecord::keyed("tx-in", format!("k{txn}-{i}"), Some(vec![txn as u8]))
                            .to_partition(0)
                    })
                    .collect(),
                offsets: vec![],
            })
            .await
            .unwrap();
        written.extend(w.iter().map(|w| w.offset));
    }
    assert!(
        written.windows(2).any(|w| w[1] > w[0] + 1),
        "commit markers take offsets: {written:?}"
    );
    let member = log.join_group("g4", "tx-in", "txn-g4-a").await.unwrap();
    assert_eq!(first_assignment(member.as_ref()).await, vec![0]);
    let mut reader = member.reader(0, 0).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), read_n(&mut reader, written.len()))
        .await
        .expect("every committed record within 30 s");
    assert_eq!(got, written);
    assert_eq!(reader.position(), written.last().unwrap() + 1);
    // A restarted reader asked to start inside the log skips the gap too.
    drop(reader);
    let mut again = member.reader(0, written[4]).await.unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        read_n(&mut again, written.len() - 4),
    )
    .await
    .expect("the rest within 30 s");
    assert_eq!(got, written[4..].to_vec());
    member.leave().await;
}

/// A node restarted after a crash fences its previous incarnation (same
/// transactional id) as soon as its writer starts, not at its first write:
/// the transaction the crashed one left open is aborted at once, so
/// `read_committed` readers get past it even while the new incarnation has
/// nothing to write (a broker without transaction timeouts, like Tansu,
/// would otherwise keep it open for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_writer_fences_its_crashed_predecessor_before_writing() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let t = Tansu::start();
    let log = KafkaLog::connect(settings(&t, "z")).await.unwrap();
    log.ensure_topic(&spec("zt", 1)).await.unwrap();
    // The crashed incarnation: a transaction begun and a record sent, never
    // ended. The producer is leaked, not dropped, so nothing ends it.
    let crashed: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", t.brokers())
        .set("transactional.id", "node-z")
        .create()
        .unwrap();
    crashed.init_transactions(Duration::from_secs(30)).unwrap();
    crashed.begin_transaction().unwrap();
    crashed
        .send(BaseRecord::to("zt").key("k").payload("open"))
        .unwrap();
    crashed.flush(Duration::from_secs(30)).unwrap();
    std::mem::forget(crashed);
    log.publish(vec![OutRecord::keyed("zt", "k", Some(b"after".to_vec()))])
        .await
        .unwrap();
    // Behind the open transaction, a committed record stays unreadable.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = read_all(&log, "zt", 1).await;
    assert!(before.is_empty(), "{} records readable", before.len());
    // The restarted incarnation only starts its writer.
    let _restarted = log.txn_writer("node-z").await.unwrap();
    common::eventually(
        "the record behind the open transaction",
        Duration::from_secs(30),
        || async {
            let recs = read_all(&log, "zt", 1).await;
            recs.iter()
                .any(|r| r.value.as_deref() == Some(&b"after"[..]))
                .then_some(())
        },
    )
    .await;
}

//! A partition's own fetch queue, split off its consumer's queue and read
//! in batches without copying records.
//!
//! rdkafka offers `split_partition_queue`, but only a per-message `poll`
//! that allocates per message; librdkafka's `rd_kafka_consume_batch_queue`
//! takes a batch under one lock and lends the records from the fetch
//! buffers. This is the small FFI around it:
//!
//! * the queue is split before librdkafka starts fetching the partition
//!   (before `assign`): `rd_kafka_queue_forward(q, NULL)` marks the queue
//!   as forwarded by the application, so later assignments leave it split;
//! * librdkafka bounds each split queue by `queued.min.messages` and
//!   `queued.max.messages.kbytes`: a reader that falls behind stops the
//!   fetching of its partition (backpressure) and memory stays bounded;
//! * a callback wakes the reader when the queue turns non-empty.

use crate::io::RecordRef;
use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use std::ffi::{c_void, CString};
use std::sync::Arc;
use tokio::sync::Notify;

/// What a split queue holds: records, end-of-partition, consumer errors.
pub(crate) enum Polled<'a> {
    Record(RecordRef<'a>),
    Eof,
    Error(String),
}

/// Records taken from librdkafka per call.
const CHUNK: usize = 512;

pub(crate) struct SplitQueue<C: ConsumerContext + 'static> {
    ptr: *mut rd::rd_kafka_queue_t,
    partition: u32,
    notify: Arc<Notify>,
    /// The client outlives its queue handles.
    _consumer: Arc<BaseConsumer<C>>,
}

// SAFETY: librdkafka queues are thread-safe (every operation takes the
// queue's lock); the handle is only destroyed in `drop`.
unsafe impl<C: ConsumerContext + 'static> Send for SplitQueue<C> {}
unsafe impl<C: ConsumerContext + 'static> Sync for SplitQueue<C> {}

unsafe extern "C" fn wake(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Notify` owned by the queue, which disables
    // this callback before releasing it.
    let notify = unsafe { &*(opaque as *const Notify) };
    notify.notify_one();
}

impl<C: ConsumerContext + 'static> SplitQueue<C> {
    /// Split `topic`/`partition` off `consumer`'s queue.
    pub(crate) fn split(
        consumer: Arc<BaseConsumer<C>>,
        topic: &str,
        partition: u32,
    ) -> Option<Self> {
        let topic = CString::new(topic).ok()?;
        let native = consumer.client().native_ptr();
        // SAFETY: a live client; the returned handle is owned by `Self`.
        let ptr =
            unsafe { rd::rd_kafka_queue_get_partition(native, topic.as_ptr(), partition as i32) };
        if ptr.is_null() {
            return None;
        }
        let notify = Arc::new(Notify::new());
        // SAFETY: `ptr` is valid; the opaque outlives the callback (see drop).
        unsafe {
            rd::rd_kafka_queue_forward(ptr, std::ptr::null_mut());
            rd::rd_kafka_queue_cb_event_enable(
                ptr,
                Some(wake),
                Arc::as_ptr(&notify) as *mut c_void,
            );
        }
        Some(SplitQueue {
            ptr,
            partition,
            notify,
            _consumer: consumer,
        })
    }

    /// Records (and events) queued.
    pub(crate) fn len(&self) -> usize {
        // SAFETY: a valid handle.
        unsafe { rd::rd_kafka_queue_length(self.ptr) }
    }

    /// Wait until the queue turns non-empty (possibly spuriously).
    pub(crate) async fn wait(&self) {
        self.notify.notified().await
    }

    /// Take up to `max` queued items without blocking; `f` sees each in
    /// order. Returns how many there were.
    pub(crate) fn drain(&self, max: usize, mut f: impl FnMut(Polled<'_>)) -> usize {
        let mut buf: [*mut rd::rd_kafka_message_t; CHUNK] = [std::ptr::null_mut(); CHUNK];
        let mut total = 0;
        while total < max {
            let want = (max - total).min(CHUNK);
            // SAFETY: `buf` has room for `want` pointers.
            let n =
                unsafe { rd::rd_kafka_consume_batch_queue(self.ptr, 0, buf.as_mut_ptr(), want) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            for &m in &buf[..n] {
                // SAFETY: librdkafka handed us `n` valid messages; each is
                // used only here and destroyed right after.
                unsafe {
                    f(self.item(&*m));
                    rd::rd_kafka_message_destroy(m);
                }
            }
            total += n;
            if n < want {
                break;
            }
        }
        total
    }

    /// # Safety
    /// `m` must be a message returned by librdkafka and not yet destroyed.
    unsafe fn item<'a>(&self, m: &'a rd::rd_kafka_message_t) -> Polled<'a> {
        use rd::rd_kafka_resp_err_t as E;
        match m.err {
            E::RD_KAFKA_RESP_ERR_NO_ERROR => {}
            E::RD_KAFKA_RESP_ERR__PARTITION_EOF => return Polled::Eof,
            e => return Polled::Error(RDKafkaErrorCode::from(e).to_string()),
        }
        let bytes = |p: *mut c_void, len: usize| -> Option<&'a [u8]> {
            if p.is_null() {
                None
            } else {
                // SAFETY: librdkafka's pointer and length of the message.
                Some(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
            }
        };
        let mut tstype = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a valid message.
        let ts = unsafe { rd::rd_kafka_message_timestamp(m, &mut tstype) };
        Polled::Record(RecordRef {
            partition: self.partition,
            offset: m.offset.max(0) as u64,
            key: bytes(m.key, m.key_len),
            value: bytes(m.payload, m.len),
            timestamp: ts.max(0),
        })
    }
}

impl<C: ConsumerContext + 'static> Drop for SplitQueue<C> {
    fn drop(&mut self) {
        // SAFETY: the handle is valid until here; the callback is disabled
        // before its opaque (`notify`) can go away.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.ptr, None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.ptr);
        }
    }
}

/// Serves a producer's events (delivery reports, errors) on its own thread,
/// woken by librdkafka when the producer's main queue turns non-empty.
///
/// rdkafka's `ThreadedProducer` polls in 100 ms steps and spins through the
/// last millisecond of each (its deadline rounds down to a 0 ms poll), ~10 %
/// of the aggregator's CPU during a run and ~2 % of a core when idle. Here
/// the thread sleeps until there is something to serve.
pub(crate) struct ProducerPoller {
    queue: *mut rd::rd_kafka_queue_t,
    signal: Arc<Signal>,
    thread: Option<std::thread::JoinHandle<()>>,
}

// SAFETY: the queue handle is only used in `drop` (`&mut self`); librdkafka
// queues are thread-safe anyway.
unsafe impl Send for ProducerPoller {}
unsafe impl Sync for ProducerPoller {}

#[derive(Default)]
struct Signal {
    state: std::sync::Mutex<(bool, bool)>, // (woken, stop)
    cv: std::sync::Condvar,
}

impl Signal {
    fn set(&self, stop: bool) {
        let mut s = self.state.lock().expect("poller lock");
        s.0 = true;
        s.1 |= stop;
        drop(s);
        self.cv.notify_one();
    }

    /// Wait until woken (or `timeout`); true once stopping.
    fn wait(&self, timeout: std::time::Duration) -> bool {
        let mut s = self.state.lock().expect("poller lock");
        if !s.0 {
            s = self.cv.wait_timeout(s, timeout).expect("poller lock").0;
        }
        s.0 = false;
        s.1
    }
}

unsafe extern "C" fn signal(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the `Signal` owned by the poller, which disables
    // this callback before releasing it.
    let s = unsafe { &*(opaque as *const Signal) };
    s.set(false);
}

impl ProducerPoller {
    pub(crate) fn start<C>(
        producer: Arc<rdkafka::producer::BaseProducer<C>>,
        name: String,
    ) -> std::io::Result<Self>
    where
        C: rdkafka::producer::ProducerContext + 'static,
    {
        use rdkafka::producer::Producer;
        // SAFETY: a live client; the handle is owned by `Self`.
        let queue = unsafe { rd::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        let signal = Arc::new(Signal::default());
        // SAFETY: a valid queue; the opaque outlives the callback (see drop).
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(
                queue,
                Some(self::signal),
                Arc::as_ptr(&signal) as *mut c_void,
            );
        }
        let q = QueuePtr(queue);
        let s = signal.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let q = q;
            loop {
                // The timeout only guards against a missed wake-up.
                let stop = s.wait(std::time::Duration::from_millis(500));
                // SAFETY: the handle lives until this thread is joined.
                while unsafe { rd::rd_kafka_queue_length(q.0) } > 0 {
                    producer.poll(std::time::Duration::ZERO);
                }
                if stop {
                    break;
                }
            }
        })?;
        Ok(ProducerPoller {
            queue,
            signal,
            thread: Some(thread),
        })
    }
}

struct QueuePtr(*mut rd::rd_kafka_queue_t);
// SAFETY: see `ProducerPoller`.
unsafe impl Send for QueuePtr {}

impl Drop for ProducerPoller {
    fn drop(&mut self) {
        self.signal.set(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: the thread is gone; the callback is disabled before its
        // opaque (`signal`) can go away.
        unsafe {
            rd::rd_kafka_queue_cb_event_enable(self.queue, None, std::ptr::null_mut());
            rd::rd_kafka_queue_destroy(self.queue);
        }
    }
}

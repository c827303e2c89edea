//! The supervision tree with real ractor actors and injected failures:
//! restarts happen per strategy, state is rebuilt from the store (never from
//! the dead actor's memory), backoff grows, and a supervisor escalates once
//! its restart intensity is exceeded.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use smartmsg::supervision::{
    start_supervisor, ChildSpec, RestartPolicy, Strategy, SupervisorArgs, SupervisorMsg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A durable "store": survives actor restarts, like sled does.
#[derive(Clone, Default)]
struct Store {
    counts: Arc<Mutex<HashMap<String, u64>>>,
    starts: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
    fails: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
}

impl Store {
    fn starts(&self, name: &str) -> usize {
        self.starts.lock().unwrap().get(name).map_or(0, |v| v.len())
    }
    fn start_times(&self, name: &str) -> Vec<Instant> {
        self.starts
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
}

struct Counter;

enum CounterMsg {
    Inc,
    Get(RpcReplyPort<u64>),
    Panic,
    Fail,
}

struct CounterState {
    name: String,
    store: Store,
    count: u64,
}

impl Actor for Counter {
    type Msg = CounterMsg;
    type State = CounterState;
    type Arguments = (String, Store);

    async fn pre_start(
        &self,
        _me: ActorRef<CounterMsg>,
        (name, store): (String, Store),
    ) -> Result<CounterState, ActorProcessingErr> {
        store
            .starts
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default()
            .push(Instant::now());
        // Rebuild from the store.
        let count = store
            .counts
            .lock()
            .unwrap()
            .get(&name)
            .copied()
            .unwrap_or(0);
        Ok(CounterState { name, store, count })
    }

    async fn handle(
        &self,
        _me: ActorRef<CounterMsg>,
        msg: CounterMsg,
        st: &mut CounterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CounterMsg::Inc => {
                st.count += 1;
                st.store
                    .counts
                    .lock()
                    .unwrap()
                    .insert(st.name.clone(), st.count);
            }
            CounterMsg::Get(r) => {
                let _ = r.send(st.count);
            }
            CounterMsg::Panic => {
                st.store
                    .fails
                    .lock()
                    .unwrap()
                    .entry(st.name.clone())
                    .or_default()
                    .push(Instant::now());
                panic!("injected panic")
            }
            CounterMsg::Fail => {
                st.store
                    .fails
                    .lock()
                    .unwrap()
                    .entry(st.name.clone())
                    .or_default()
                    .push(Instant::now());
                return Err("injected error".into());
            }
        }
        Ok(())
    }
}

fn spec(name: &str, store: &Store) -> ChildSpec {
    let n = name.to_string();
    let s = store.clone();
    ChildSpec::new(name, "counter", move || (Counter, (n.clone(), s.clone())))
}

fn policy(strategy: Strategy, max: u32, base_ms: u64) -> RestartPolicy {
    RestartPolicy {
        strategy,
        max_restarts: max,
        period: Duration::from_secs(30),
        backoff_base: Duration::from_millis(base_ms),
        backoff_max: Duration::from_secs(2),
        jitter: 0.5,
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn child(sup: &ActorRef<SupervisorMsg>, name: &str) -> Option<ActorRef<CounterMsg>> {
    let children = ractor::call!(sup, SupervisorMsg::Children).unwrap();
    children
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, c)| c)
        .map(ActorRef::from)
}

async fn live_child(sup: &ActorRef<SupervisorMsg>, name: &str) -> ActorRef<CounterMsg> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = child(sup, name).await {
            return c;
        }
        assert!(Instant::now() < deadline, "{name} never came back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn one_for_one_restarts_only_the_failed_child_and_rebuilds_state_from_the_store() {
    let store = Store::default();
    let sup = start_supervisor(
        SupervisorArgs {
            kind: "test".into(),
            policy: policy(Strategy::OneForOne, 5, 10),
            children: vec![spec("a", &store), spec("b", &store)],
        },
        None,
    )
    .await
    .unwrap();
    let a = live_child(&sup, "a").await;
    for _ in 0..3 {
        a.send_message(CounterMsg::Inc).unwrap();
    }
    assert_eq!(ractor::call!(a, CounterMsg::Get).unwrap(), 3);
    a.send_message(CounterMsg::Panic).unwrap();
    wait_for("a restarted", Duration::from_secs(5), || {
        store.starts("a") == 2
    })
    .await;
    let a2 = live_child(&sup, "a").await;
    assert_ne!(a2.get_id(), a.get_id());
    assert_eq!(
        ractor::call!(a2, CounterMsg::Get).unwrap(),
        3,
        "state rebuilt from the store"
    );
    assert_eq!(store.starts("b"), 1, "sibling untouched");
    // An error return is a failure too.
    a2.send_message(CounterMsg::Fail).unwrap();
    wait_for("a restarted again", Duration::from_secs(5), || {
        store.starts("a") == 3
    })
    .await;
    sup.stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test]
async fn one_for_all_restarts_every_child() {
    let store = Store::default();
    let sup = start_supervisor(
        SupervisorArgs {
            kind: "test".into(),
            policy: policy(Strategy::OneForAll, 5, 10),
            children: vec![spec("a", &store), spec("b", &store), spec("c", &store)],
        },
        None,
    )
    .await
    .unwrap();
    live_child(&sup, "b")
        .await
        .send_message(CounterMsg::Panic)
        .unwrap();
    wait_for("all restarted", Duration::from_secs(5), || {
        store.starts("a") == 2 && store.starts("b") == 2 && store.starts("c") == 2
    })
    .await;
    sup.stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test]
async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
    let store = Store::default();
    let sup = start_supervisor(
        SupervisorArgs {
            kind: "test".into(),
            policy: policy(Strategy::RestForOne, 5, 10),
            children: vec![spec("a", &store), spec("b", &store), spec("c", &store)],
        },
        None,
    )
    .await
    .unwrap();
    live_child(&sup, "b")
        .await
        .send_message(CounterMsg::Panic)
        .unwrap();
    wait_for("b and c restarted", Duration::from_secs(5), || {
        store.starts("b") == 2 && store.starts("c") == 2
    })
    .await;
    live_child(&sup, "c").await;
    assert_eq!(store.starts("a"), 1);
    sup.stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test]
async fn backoff_grows_between_restarts() {
    let store = Store::default();
    let sup = start_supervisor(
        SupervisorArgs {
            kind: "test".into(),
            policy: policy(Strategy::OneForOne, 10, 100),
            children: vec![spec("a", &store)],
        },
        None,
    )
    .await
    .unwrap();
    for i in 1..=3 {
        live_child(&sup, "a")
            .await
            .send_message(CounterMsg::Fail)
            .unwrap();
        wait_for("restart", Duration::from_secs(5), || {
            store.starts("a") == i + 1
        })
        .await;
    }
    let t = store.start_times("a");
    let f = store.fails.lock().unwrap().get("a").cloned().unwrap();
    // Delays are 100 ms, 200 ms, 400 ms, each with up to 50% jitter.
    // (Failures are error returns here: a panic's backtrace printing would
    // add its own delay before the supervisor even hears of it.)
    let gap1 = t[1] - f[0];
    let gap3 = t[3] - f[2];
    assert!(gap3 >= Duration::from_millis(200), "third backoff {gap3:?}");
    assert!(gap3 > gap1, "backoff grows: {gap1:?} then {gap3:?}");
    sup.stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test]
async fn escalates_to_the_parent_when_intensity_is_exceeded() {
    let store = Store::default();
    let inner_store = store.clone();
    // root -> mid (max 2 restarts) -> a
    let mid = smartmsg::supervision::supervisor::supervisor_child("mid", move || SupervisorArgs {
        kind: "mid".into(),
        policy: policy(Strategy::OneForOne, 2, 5),
        children: vec![spec("a", &inner_store)],
    });
    let root = start_supervisor(
        SupervisorArgs {
            kind: "root".into(),
            policy: policy(Strategy::OneForOne, 5, 5),
            children: vec![mid],
        },
        None,
    )
    .await
    .unwrap();
    let mid_ref = || async {
        let children = ractor::call!(root, SupervisorMsg::Children).unwrap();
        children[0].1.clone().map(ActorRef::<SupervisorMsg>::from)
    };
    let first_mid = mid_ref().await.unwrap();
    // Three failures within the period: two restarts, then mid gives up.
    for i in 1..=3 {
        let a = live_child(&first_mid, "a").await;
        a.send_message(CounterMsg::Panic).unwrap();
        if i < 3 {
            wait_for("a restarted by mid", Duration::from_secs(5), || {
                store.starts("a") == i + 1
            })
            .await;
        }
    }
    // mid escalated: root restarts it (a fresh mid with a fresh child).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(m) = mid_ref().await {
            if m.get_id() != first_mid.get_id() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "root never restarted the escalating supervisor"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for(
        "a started under the new mid",
        Duration::from_secs(5),
        || store.starts("a") == 4,
    )
    .await;
    root.stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .unwrap();
}

#[tokio::test]
async fn top_supervisor_stops_when_it_gives_up() {
    let store = Store::default();
    let sup = start_supervisor(
        SupervisorArgs {
            kind: "test".into(),
            policy: policy(Strategy::OneForOne, 1, 5),
            children: vec![spec("a", &store)],
        },
        None,
    )
    .await
    .unwrap();
    live_child(&sup, "a")
        .await
        .send_message(CounterMsg::Panic)
        .unwrap();
    wait_for("first restart", Duration::from_secs(5), || {
        store.starts("a") == 2
    })
    .await;
    live_child(&sup, "a")
        .await
        .send_message(CounterMsg::Panic)
        .unwrap();
    sup.get_cell()
        .wait(Some(Duration::from_secs(5)))
        .await
        .expect("supervisor terminated after escalation");
}

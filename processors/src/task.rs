//! A task is one processor on one partition: the unit the runtime assigns, restores and
//! commits, and the unit the TestDriver interleaves. It owns what every processor needs
//! the same way — the clock, timers, the expiry sweep, and turning rejected input into
//! `events.dlq` records — so processors only hold business rules.

use crate::processor::{timer_key, Counter, Ctx, Output, ProcessError, Processor, Record, EXPIRY_STORE, TIMERS_STORE};
use crate::store::{decode_value, StoreSet};
use crate::topology::{Clock, Topology};
use base64::Engine as _;
use std::collections::BTreeMap;

pub const DLQ_TOPIC: &str = "events.dlq";

/// How to build one processor of the topology, and what it reads and writes.
pub struct ProcessorSpec {
    pub name: &'static str,
    /// Input topics; all are co-partitioned (task N reads partition N of each).
    pub inputs: Vec<String>,
    /// Stores the processor uses (timers and the expiry index are added to every task).
    pub stores: Vec<&'static str>,
    pub outputs: Vec<String>,
    pub factory: Box<dyn Fn() -> Box<dyn Processor> + Send + Sync>,
}

impl ProcessorSpec {
    /// Every store a task of this processor has.
    pub fn all_stores(&self) -> Vec<&'static str> {
        let mut all = self.stores.clone();
        all.push(TIMERS_STORE);
        all.push(EXPIRY_STORE);
        all
    }
}

/// What one step of a task produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TaskOutput {
    pub outputs: Vec<Output>,
    pub counters: Vec<Counter>,
    /// Event times whose effects this step made visible.
    pub visible: Vec<i64>,
}

impl TaskOutput {
    fn absorb(&mut self, ctx: Ctx<'_>) {
        self.outputs.extend(ctx.outputs);
        self.counters.extend(ctx.counters);
        self.visible.extend(ctx.visible);
    }
}

pub struct Task {
    pub processor_name: &'static str,
    pub partition: u32,
    processor: Box<dyn Processor>,
    clock: Clock,
    /// Highest record timestamp seen: "now" under `clock: event`.
    stream_time: i64,
    partitions: BTreeMap<String, u32>,
    /// `Processor::init` ran.
    started: bool,
}

/// Guard against timers that keep rescheduling themselves at `now`.
const MAX_TIMER_ROUNDS: usize = 10_000;

impl Task {
    pub fn new(spec: &ProcessorSpec, topology: &Topology, partition: u32) -> Task {
        Task {
            processor_name: spec.name,
            partition,
            processor: (spec.factory)(),
            clock: topology.clock,
            stream_time: 0,
            partitions: topology.partition_map(),
            started: false,
        }
    }

    pub fn stream_time(&self) -> i64 {
        self.stream_time
    }

    fn now(&self, wall_now: i64) -> i64 {
        match self.clock {
            Clock::Event => self.stream_time,
            Clock::Wall => wall_now,
        }
    }

    /// Process one record, then fire whatever timers and expiries became due.
    pub fn process(
        &mut self,
        stores: &mut dyn StoreSet,
        record: &Record,
        wall_now: i64,
    ) -> Result<TaskOutput, ProcessError> {
        let mut now = self.now(wall_now);
        let mut out = TaskOutput::default();
        self.start(stores, now, &mut out)?;
        let partitions = &self.partitions;
        let mut ctx = Ctx::new(now, self.clock, self.partition, stores, partitions);
        match self.processor.process(&mut ctx, record) {
            Ok(()) => {
                // Under `clock: event` the processor moved time to the record's event
                // time; timers due by then fire below.
                now = ctx.now;
                out.absorb(ctx)
            }
            Err(ProcessError::Reject { reason, detail }) => {
                // A processor rejects before it writes, so dropping its outputs loses
                // nothing; the input itself is kept whole on the DLQ.
                let mut ctx = Ctx::new(now, self.clock, self.partition, stores, partitions);
                ctx.count("dlq", reason);
                let letter = dead_letter(self.processor_name, record, reason, &detail, now);
                ctx.emit(DLQ_TOPIC, record.key.as_deref().unwrap_or_default(), Some(letter), None);
                out.absorb(ctx);
            }
            Err(fatal) => return Err(fatal),
        }
        // Under `clock: event` time moves with records, so timers are checked whenever
        // stream time advances; under `clock: wall` the runtime punctuates every commit
        // interval, and checking after each record would only cost two scans per record.
        if self.clock == Clock::Event && now > self.stream_time {
            self.stream_time = now;
            self.fire_due(stores, now, &mut out)?;
        }
        Ok(out)
    }

    /// Let the processor write what it caches; before every commit.
    pub fn flush(&mut self, stores: &mut dyn StoreSet, wall_now: i64) -> Result<TaskOutput, ProcessError> {
        let mut out = TaskOutput::default();
        let mut ctx = Ctx::new(self.now(wall_now), self.clock, self.partition, stores, &self.partitions);
        self.processor.flush(&mut ctx)?;
        out.absorb(ctx);
        Ok(out)
    }

    /// Advance time without a record (wall-clock punctuation).
    pub fn punctuate(&mut self, stores: &mut dyn StoreSet, wall_now: i64) -> Result<TaskOutput, ProcessError> {
        let now = self.now(wall_now);
        let mut out = TaskOutput::default();
        self.start(stores, now, &mut out)?;
        self.fire_due(stores, now, &mut out)?;
        Ok(out)
    }

    fn start(&mut self, stores: &mut dyn StoreSet, now: i64, out: &mut TaskOutput) -> Result<(), ProcessError> {
        if !self.started {
            let mut ctx = Ctx::new(now, self.clock, self.partition, stores, &self.partitions);
            self.processor.init(&mut ctx)?;
            out.absorb(ctx);
            self.started = true;
        }
        Ok(())
    }

    fn fire_due(&mut self, stores: &mut dyn StoreSet, now: i64, out: &mut TaskOutput) -> Result<(), ProcessError> {
        let until = timer_key(now.saturating_add(1), &[]);
        for _ in 0..MAX_TIMER_ROUNDS {
            let due = stores.store(TIMERS_STORE)?.range(&[0u8; 8], &until, 64)?;
            if due.is_empty() {
                break;
            }
            for (key, stored) in due {
                stores.store(TIMERS_STORE)?.delete(&key)?;
                let (_, payload) = decode_value(&key, &stored)?;
                let mut ctx = Ctx::new(now, self.clock, self.partition, stores, &self.partitions);
                self.processor.on_timer(&mut ctx, &key[8..], &payload)?;
                out.absorb(ctx);
            }
        }
        for _ in 0..MAX_TIMER_ROUNDS {
            let due = stores.store(EXPIRY_STORE)?.range(&[0u8; 8], &until, 256)?;
            if due.is_empty() {
                break;
            }
            for (index_key, _) in due {
                stores.store(EXPIRY_STORE)?.delete(&index_key)?;
                let rest = &index_key[8..];
                let Some(sep) = rest.iter().position(|b| *b == 0) else { continue };
                let store = String::from_utf8_lossy(&rest[..sep]).into_owned();
                let key = &rest[sep + 1..];
                let mut ctx = Ctx::new(now, self.clock, self.partition, stores, &self.partitions);
                let expired = match ctx.stores().store(&store)?.get(key)? {
                    Some(stored) => {
                        let (expires_at, _) = decode_value(key, &stored)?;
                        expires_at != 0 && expires_at <= now
                    }
                    None => false,
                };
                if expired {
                    ctx.stores().store(&store)?.delete(key)?;
                    self.processor.on_expired(&mut ctx, &store, key)?;
                }
                out.absorb(ctx);
            }
        }
        Ok(())
    }
}

fn dead_letter(processor: &str, record: &Record, reason: &str, detail: &str, now: i64) -> Vec<u8> {
    let original = record.value.as_deref().unwrap_or_default();
    let letter = serde_json::json!({
        "reason": reason,
        "detail": detail,
        "source_topic": record.topic,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "processor": processor,
        "original_base64": base64::engine::general_purpose::STANDARD.encode(original),
        "at": now,
    });
    letter.to_string().into_bytes()
}

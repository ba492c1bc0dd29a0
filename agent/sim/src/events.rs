//! The node's event log: a bounded queue of [`GpuEvent`]s with consecutive sequence numbers.

use std::collections::VecDeque;

use hearth_proto::gpu::{GpuEvent, GpuEventKind};

use crate::node::EVENT_LOG_CAPACITY;

/// The last [`EVENT_LOG_CAPACITY`] events. Sequence numbers start at 1 and never repeat; the
/// events in the queue have consecutive numbers `first_seq..next_seq`.
#[derive(Debug)]
pub(crate) struct EventLog {
    events: VecDeque<GpuEvent>,
    /// Sequence number of `events[0]` (equals `next_seq` while empty).
    first_seq: u64,
    /// Sequence number the next event gets.
    next_seq: u64,
}

impl EventLog {
    pub(crate) fn new() -> Self {
        Self { events: VecDeque::with_capacity(EVENT_LOG_CAPACITY), first_seq: 1, next_seq: 1 }
    }

    /// Append an event, dropping the oldest when the log is full.
    pub(crate) fn push(&mut self, gpu: u32, uuid: &str, kind: GpuEventKind) {
        if self.events.len() >= EVENT_LOG_CAPACITY {
            self.events.pop_front();
            self.first_seq += 1;
        }
        self.events.push_back(GpuEvent { gpu, uuid: uuid.to_string(), kind });
        self.next_seq += 1;
    }

    /// Newest sequence number ever assigned, 0 when none.
    pub(crate) fn newest(&self) -> u64 {
        self.next_seq - 1
    }

    /// Retained events with a sequence number above `after`, oldest first, and the newest number.
    pub(crate) fn since(&self, after: u64) -> (Vec<GpuEvent>, u64) {
        let newest = self.newest();
        if after >= newest {
            return (Vec::new(), newest);
        }
        let start = after.saturating_add(1).max(self.first_seq);
        let skip = usize::try_from(start - self.first_seq).unwrap_or(usize::MAX);
        let out = if skip >= self.events.len() {
            Vec::new()
        } else {
            self.events.range(skip..).cloned().collect()
        };
        (out, newest)
    }
}

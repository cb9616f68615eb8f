//! Given/when/then for pure aggregates: given past events, when a command, then events or
//! a typed error.

#![allow(dead_code)]

use amplog_domain::{Aggregate, DomainEvent};
use chrono::{DateTime, TimeZone, Utc};
use std::fmt::Debug;

pub fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

pub fn id<T: From<uuid::Uuid>>(n: u128) -> T {
    T::from(uuid::Uuid::from_u128(n))
}

pub struct Given<A: Aggregate> {
    state: A,
}

pub fn given<A: Aggregate>(events: &[A::Event]) -> Given<A> {
    Given { state: A::replay(events) }
}

pub struct Then<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> Then<A> {
        Then { result: self.state.decide(&command) }
    }
}

impl<A: Aggregate> Then<A>
where
    A::Error: Debug,
{
    pub fn then(self, expected: &[A::Event]) {
        assert_eq!(self.result.expect("the command should be accepted"), expected);
    }

    pub fn then_err(self, expected: A::Error) {
        match self.result {
            Ok(events) => panic!("expected {expected:?}, got events {events:?}"),
            Err(e) => assert_eq!(e, expected),
        }
    }

    /// The command is accepted and yields exactly these event types.
    pub fn then_types(self, expected: &[&str]) {
        let events = self.result.expect("the command should be accepted");
        let types: Vec<String> = events.iter().map(|e| e.to_parts().event_type).collect();
        assert_eq!(types, expected);
    }

    pub fn events(self) -> Vec<A::Event> {
        self.result.expect("the command should be accepted")
    }
}

/// What one cell of a command × state table expects: the event types, or the error.
pub type Expect<E> = Result<&'static [&'static str], E>;

/// Checks every command in every state against `table` (one row per state, one column
/// per command, in the order given).
pub fn check_matrix<A: Aggregate>(
    states: &[(&str, Vec<A::Event>)],
    commands: &[(&str, A::Command)],
    table: &[(&str, Vec<Expect<A::Error>>)],
) where
    A::Command: Clone,
{
    assert_eq!(states.len(), table.len(), "one row per state");
    for ((state, history), (row_state, row)) in states.iter().zip(table) {
        assert_eq!(state, row_state, "rows follow the states' order");
        assert_eq!(row.len(), commands.len(), "one column per command in row {state}");
        for ((command_name, command), expected) in commands.iter().zip(row) {
            let result = A::replay(history).decide(command);
            let got: Result<Vec<String>, A::Error> =
                result.map(|events| events.iter().map(|e| e.to_parts().event_type).collect());
            let want: Result<Vec<String>, A::Error> =
                expected.clone().map(|types| types.iter().map(ToString::to_string).collect());
            assert_eq!(got, want, "{command_name} in state {state}");
        }
    }
}

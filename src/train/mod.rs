//! Training workflows: the optimizer (and, with the trainer issue, the loop, schedules and
//! checkpoints).

pub mod optim;

//! Training workflows: arguments, the SFT loop, optimizer, schedules, checkpoints, plots.

pub mod args;
pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use args::TrainingArguments;
pub use trainer::{Callbacks, Control, EvalMetrics, NoCallbacks, SftTrainer, TrainSummary};

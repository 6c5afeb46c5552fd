//! Training workflows: arguments, the SFT trainer and its step, optimizer, schedules,
//! checkpoints, run logging, plots.

pub mod args;
pub mod callbacks;
pub mod checkpoint;
pub mod distributed;
pub mod logging;
pub mod optim;
pub mod plot;
pub mod record;
pub mod run_dir;
pub mod schedule;
pub mod step;
pub mod tensorboard;
pub mod trainer;

pub use args::TrainingArguments;
pub use callbacks::{Callbacks, Control, NoCallbacks};
pub use step::{MicroBatch, StepState, StepStats};
pub use trainer::{EvalMetrics, OnInterrupt, SftTrainer, TrainSummary};

//! Process supervision (being written).

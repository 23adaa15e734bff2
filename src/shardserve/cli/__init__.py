"""Command line: shardserve generate | plan | make-test-model."""

// The test cluster's own images' programs (no dependencies); built by tests/cluster/build.sh.
module kmirror.test/cluster/images

go 1.25.0

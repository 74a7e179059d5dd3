#!/bin/busybox sh
# PID 1 of a kernel-matrix guest (see matrix.sh): loads the modules the tests need, mounts this
# machine's root file system read-only over 9p, gives it fresh /proc, /sys, /dev, writable
# temp dirs and a writable copy of /etc, runs the plan named on the kernel command line in it, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod "/modules/$m" 2>/dev/null || echo "kmirror-guest: insmod $m failed"
done
plan=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^kmirror.plan=//p')
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host; then
    echo "kmirror-guest: cannot mount the host's root over 9p"
    echo o > /proc/sysrq-trigger
fi
# The repository may lie under a directory that gets a tmpfs below (a clone in /tmp): keep a
# view of it to put back on top.
root=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^kmirror.root=//p')
mkdir -p /repo
mount -o bind "/host$root" /repo
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /host/dev/pts
for d in tmp run var/tmp dev/shm; do
    mount -t tmpfs -o mode=1777 tmpfs "/host/$d"
done
# A writable copy of /etc: tests create host-only files there (e.g. the target of a pod
# symlink that must not be followed to the host).
mkdir -p /etc-copy
mount -t tmpfs -o mode=0755 tmpfs /etc-copy
cp -a /host/etc/. /etc-copy/
mount -o bind /etc-copy /host/etc
mkdir -p "/host$root" 2>/dev/null
mount -o bind /repo "/host$root"
mount -t bpf bpf /host/sys/fs/bpf 2>/dev/null
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
echo "kmirror-guest: kernel $(uname -r) up, running $plan"
chroot /host /bin/bash "$plan"
echo "kmirror-guest: plan exited $?"
echo o > /proc/sysrq-trigger
sleep 10

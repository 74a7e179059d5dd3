// The pod sandbox's "pause" process: holds the pod's namespaces open, reaps the zombies of
// processes that end up as its children (it is PID 1 when the pod shares its PID namespace), and
// exits when asked. No registry is reachable, so the cluster builds this instead of pulling it.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

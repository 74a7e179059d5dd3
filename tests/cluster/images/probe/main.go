// probe: the test cluster's smoke-test program, one static binary in its own image, so that
// pods need no shell or distribution. Subcommands:
//
//	probe serve ADDR          HTTP: answers "hello from <hostname>", logs each request to stdout
//	probe get URL             prints the body; exit 1 with the error
//	probe resolve NAME        prints the addresses (Go's resolver, the pod's resolv.conf)
//	probe dial ADDR SECONDS   TCP connect; prints "connected" or the error, exit 1 on error
//	probe sleep               waits for SIGTERM/SIGINT
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: probe serve|get|resolve|dial|sleep ARGS"))
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		need(args, 1)
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			fmt.Printf("request from %s for %s\n", r.RemoteAddr, r.URL.Path)
			fmt.Fprintf(w, "hello from %s\n", host)
		})
		go waitSignal()
		fail(http.ListenAndServe(args[0], nil))
	case "get":
		need(args, 1)
		client := http.Client{Timeout: 10 * time.Second}
		resp, err := client.Get(args[0])
		if err != nil {
			fail(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			fail(err)
		}
		os.Stdout.Write(body)
		if resp.StatusCode != http.StatusOK {
			fail(fmt.Errorf("status %s", resp.Status))
		}
	case "resolve":
		need(args, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupHost(ctx, args[0])
		if err != nil {
			fail(err)
		}
		for _, a := range addrs {
			fmt.Println(a)
		}
	case "dial":
		need(args, 2)
		secs, err := strconv.Atoi(args[1])
		if err != nil {
			fail(err)
		}
		conn, err := net.DialTimeout("tcp", args[0], time.Duration(secs)*time.Second)
		if err != nil {
			fail(err)
		}
		conn.Close()
		fmt.Println("connected")
	case "sleep":
		waitSignal()
	default:
		fail(fmt.Errorf("unknown subcommand %q", os.Args[1]))
	}
}

func need(args []string, n int) {
	if len(args) != n {
		fail(fmt.Errorf("%s needs %d argument(s)", os.Args[1], n))
	}
}

func waitSignal() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
	os.Exit(0)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "probe:", err)
	os.Exit(1)
}

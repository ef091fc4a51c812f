// Plan-driven HTTPS client for the AegisPlane integration tests: Go's net/http over Go's
// own crypto/tls (no C library), built by the tests crate's build script with Debian's
// golang (standard library only, no module, no network).
//
// Usage: go_client --port P --plan FILE [--host 127.0.0.1] [--http2]
//
// Same plan format as py_client.py: a list of requests sent in order over one keep-alive
// connection, or {"connections": [[...], ...]} whose lists run concurrently, one connection
// (one Transport) each. HTTP/1.1 by default: the Transport offers no HTTP/2 (TLSNextProto set
// to an empty map). With --http2 (ALPN h2, Go's bundled HTTP/2): the first request of each
// list is sent alone, to open the connection, then the others at once, as concurrent
// streams on it. Go asks for gzip by itself and decodes it ("content_encoding" then says
// gzip); "bytes" is the length of the decoded body.
// One JSON line per response: {"conn", "i", "status", "bytes", "content_encoding", "server",
// "proto"}.
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
)

type request struct {
	Method  string            `json:"method"`
	Path    string            `json:"path"`
	Headers map[string]string `json:"headers"`
	Body    json.RawMessage   `json:"body"`
}

type line struct {
	Conn            int    `json:"conn"`
	I               int    `json:"i"`
	Status          int    `json:"status"`
	Bytes           int    `json:"bytes"`
	ContentEncoding string `json:"content_encoding"`
	Server          string `json:"server"`
	Proto           string `json:"proto"`
}

func readPlan(path string) [][]request {
	data, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	var single []request
	if json.Unmarshal(data, &single) == nil {
		return [][]request{single}
	}
	var many struct {
		Connections [][]request `json:"connections"`
	}
	if err := json.Unmarshal(data, &many); err != nil {
		fail(err)
	}
	return many.Connections
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "go_client: %v\n", err)
	os.Exit(1)
}

func main() {
	port := flag.Int("port", 0, "mock provider port")
	host := flag.String("host", "127.0.0.1", "mock provider host")
	planPath := flag.String("plan", "", "plan file")
	http2 := flag.Bool("http2", false, "offer HTTP/2 (ALPN h2) and send concurrent streams")
	flag.Parse()
	if *port == 0 || *planPath == "" {
		fail(fmt.Errorf("--port and --plan are required"))
	}
	base := fmt.Sprintf("https://%s:%d", *host, *port)
	var out sync.Mutex
	var wg sync.WaitGroup
	for c, reqs := range readPlan(*planPath) {
		wg.Add(1)
		go func(c int, reqs []request) {
			defer wg.Done()
			transport := &http.Transport{
				TLSClientConfig:     &tls.Config{InsecureSkipVerify: true},
				MaxConnsPerHost:     1,
				MaxIdleConnsPerHost: 1,
			}
			if *http2 {
				transport.ForceAttemptHTTP2 = true
			} else {
				transport.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
			}
			client := &http.Client{Transport: transport}
			if !*http2 {
				for i, r := range reqs {
					send(client, base, c, i, r, &out)
				}
				return
			}
			send(client, base, c, 0, reqs[0], &out)
			var streams sync.WaitGroup
			for i, r := range reqs[1:] {
				streams.Add(1)
				go func(i int, r request) {
					defer streams.Done()
					send(client, base, c, i, r, &out)
				}(i+1, r)
			}
			streams.Wait()
		}(c, reqs)
	}
	wg.Wait()
}

// send makes request i of connection c and prints its line.
func send(client *http.Client, base string, c, i int, r request, out *sync.Mutex) {
	var body io.Reader
	if len(r.Body) > 0 && string(r.Body) != "null" {
		// Compact JSON, the bytes serde_json::to_vec gives.
		var compact bytes.Buffer
		if err := json.Compact(&compact, r.Body); err != nil {
			fail(err)
		}
		body = &compact
	}
	method := r.Method
	if method == "" {
		method = "GET"
	}
	req, err := http.NewRequest(method, base+r.Path, body)
	if err != nil {
		fail(err)
	}
	for k, v := range r.Headers {
		req.Header.Set(k, v)
	}
	if body != nil && req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		fail(err)
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		fail(err)
	}
	encoding := resp.Header.Get("Content-Encoding")
	if resp.Uncompressed {
		encoding = "gzip"
	}
	text, _ := json.Marshal(line{c, i, resp.StatusCode, len(data), encoding, resp.Header.Get("X-Mock-Server"), resp.Proto})
	out.Lock()
	os.Stdout.Write(append(text, '\n'))
	out.Unlock()
}

// Headwater Go worker: the main package every Go function is built into (the build step adds handler.go).
//
// The runtime server (runtimes/go/server.py) runs the prebuilt binary in a child it has already
// contained (sandbox uid, rlimits, clean environment, cwd = the unpacked artifact). Requests arrive
// on fd 3 and results leave on fd 4, each an 8-byte big-endian length and JSON (runtimes/README.md);
// the function's stdout/stderr are the execution's logs.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"reflect"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

type request struct {
	ExecutionID string                 `json:"execution_id"`
	Entry       string                 `json:"entry"`
	Input       json.RawMessage        `json:"input"`
	Context     map[string]interface{} `json:"context"`
	Timeout     float64                `json:"timeout"`
}

type result struct {
	Status    string      `json:"status"`
	Reason    string      `json:"reason"`
	Output    interface{} `json:"output"`
	Leftovers bool        `json:"leftovers,omitempty"`
	Recycle   bool        `json:"recycle,omitempty"`
}

// ContextKey is the key of the execution's metadata (execution_id, function_id, …) in the handler's
// context: ctx.Value("headwater") is a map[string]interface{}.
const ContextKey = "headwater"

var (
	contextType = reflect.TypeOf((*context.Context)(nil)).Elem()
	errorType   = reflect.TypeOf((*error)(nil)).Elem()
	me          = os.Getpid()
)

// adapter checks a handler's signature once, like AWS Lambda's Go handlers:
// func([ctx context.Context,] [input T]) ([output U,] [err error]).
type adapter struct {
	fn      reflect.Value
	takeCtx bool
	input   reflect.Type // nil: no input parameter
	output  bool
	err     bool
}

func newAdapter(h interface{}) (*adapter, error) {
	fn := reflect.ValueOf(h)
	if fn.Kind() != reflect.Func {
		return nil, fmt.Errorf("handler is a %s, not a function", fn.Kind())
	}
	t := fn.Type()
	a := &adapter{fn: fn}
	if t.IsVariadic() {
		return nil, errors.New("handler may not be variadic")
	}
	switch t.NumIn() {
	case 0:
	case 1:
		if t.In(0).Implements(contextType) && t.In(0).Kind() == reflect.Interface {
			a.takeCtx = true
		} else {
			a.input = t.In(0)
		}
	case 2:
		if !(t.In(0).Kind() == reflect.Interface && t.In(0).Implements(contextType)) {
			return nil, errors.New("a handler with two arguments takes context.Context first")
		}
		a.takeCtx, a.input = true, t.In(1)
	default:
		return nil, errors.New("handler takes at most two arguments: (context.Context, input)")
	}
	switch t.NumOut() {
	case 0:
	case 1:
		if t.Out(0).Implements(errorType) {
			a.err = true
		} else {
			a.output = true
		}
	case 2:
		if !t.Out(1).Implements(errorType) {
			return nil, errors.New("a handler with two results returns error second")
		}
		a.output, a.err = true, true
	default:
		return nil, errors.New("handler returns at most two values: (output, error)")
	}
	return a, nil
}

func (a *adapter) call(ctx context.Context, input json.RawMessage) (out interface{}, err error) {
	var args []reflect.Value
	if a.takeCtx {
		args = append(args, reflect.ValueOf(ctx))
	}
	if a.input != nil {
		v := reflect.New(a.input)
		if len(input) > 0 && !bytes.Equal(input, []byte("null")) {
			if err := json.Unmarshal(input, v.Interface()); err != nil {
				return nil, fmt.Errorf("input does not fit the handler's %s parameter: %w", a.input, err)
			}
		}
		args = append(args, v.Elem())
	}
	results := a.fn.Call(args)
	if a.err {
		if e := results[len(results)-1]; !e.IsNil() {
			err = e.Interface().(error)
		}
	}
	if a.output {
		out = results[0].Interface()
	}
	return out, err
}

// exported is a snake_case name in Go's exported CamelCase: open_files → OpenFiles.
func exported(name string) string {
	var b strings.Builder
	for _, part := range strings.Split(name, "_") {
		if part != "" {
			b.WriteString(strings.ToUpper(part[:1]) + part[1:])
		}
	}
	return b.String()
}

// reason classifies a failure like the other runtimes do.
func reason(err error) string {
	switch {
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE), errors.Is(err, syscall.EFBIG):
		return "files"
	case errors.Is(err, syscall.EAGAIN):
		return "processes"
	case errors.Is(err, syscall.ENOMEM):
		return "memory"
	}
	return "error"
}

// userStack is the panicking goroutine's stack with only the function's own frames, paths relative
// to the package (no build directory, no runtime or worker frames).
func userStack() string {
	lines := strings.Split(string(debug.Stack()), "\n")
	var kept []string
	if len(lines) > 0 {
		kept = append(kept, lines[0])
	}
	for i := 1; i+1 < len(lines); i += 2 {
		where := strings.TrimSpace(lines[i+1])
		if strings.HasPrefix(where, sourceRoot) && !strings.HasPrefix(where, sourceRoot+"headwater_main/") {
			kept = append(kept, lines[i], "\t"+strings.TrimPrefix(where, sourceRoot))
		}
	}
	return strings.Join(kept, "\n")
}

func invoke(a *adapter, req *request) (res result) {
	timeout := time.Duration(req.Timeout * float64(time.Second))
	ctx := context.WithValue(context.Background(), ContextKey, req.Context) //nolint:staticcheck // a string key the function needs no import for
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	defer func() {
		if r := recover(); r != nil {
			if os.Getpid() != me {
				os.Exit(1)
			}
			fmt.Fprintf(os.Stderr, "panic: %v\n\n%s\n", r, userStack())
			res = result{Status: "failed", Reason: "error", Output: fmt.Sprint(r)}
			if err, ok := r.(error); ok {
				res.Reason = reason(err)
			}
		}
	}()
	out, err := a.call(ctx, req.Input)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		r := reason(err)
		message := err.Error()
		if r == "processes" {
			message = "Function reached its process limit: " + message + " (EAGAIN)"
		}
		return result{Status: "failed", Reason: r, Output: message}
	}
	if _, err := json.Marshal(out); err != nil {
		message := fmt.Sprintf("Function returned a value that is not JSON serialisable (%T): %v", out, err)
		fmt.Fprintln(os.Stderr, message)
		return result{Status: "failed", Reason: "error", Output: message}
	}
	return result{Status: "success", Reason: "ok", Output: out}
}

// leftovers reaps what the function's processes left and says whether any still run: this worker
// is their subreaper (set before exec), so all of them are its children.
func leftovers() bool {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err != nil {
			return false
		}
		if pid == 0 {
			return true
		}
	}
}

func send(w io.Writer, res result) {
	payload, err := json.Marshal(res)
	if err != nil {
		payload, _ = json.Marshal(result{Status: "failed", Reason: "error", Output: err.Error()})
	}
	var head [8]byte
	binary.BigEndian.PutUint64(head[:], uint64(len(payload)))
	_, _ = w.Write(append(head[:], payload...))
}

func main() {
	signal.Ignore(syscall.SIGXFSZ) // a too-big file fails the write (EFBIG) instead of killing the worker
	requests := os.NewFile(3, "requests")
	results := os.NewFile(4, "results")
	adapters := map[string]*adapter{}
	for {
		var head [8]byte
		if _, err := io.ReadFull(requests, head[:]); err != nil {
			return // the server retired this worker, or died
		}
		body := make([]byte, binary.BigEndian.Uint64(head[:]))
		if _, err := io.ReadFull(requests, body); err != nil {
			return
		}
		var req request
		if err := json.Unmarshal(body, &req); err != nil {
			send(results, result{Status: "failed", Reason: "error", Output: "unreadable request: " + err.Error()})
			continue
		}
		name := req.Entry[strings.LastIndex(req.Entry, ".")+1:]
		a, ok := adapters[name]
		if !ok {
			h, found := handlers[name]
			if !found {
				// Qinling-style entries name functions in snake case (main.main, hostile.open_files):
				// they find the exported Go function (Main, OpenFiles).
				h, found = handlers[exported(name)]
			}
			if !found {
				send(results, result{Status: "failed", Reason: "error", Output: fmt.Sprintf(
					"The package has no exported function %q (entry %q names 'package.Function').", name, req.Entry)})
				continue
			}
			var err error
			if a, err = newAdapter(h); err != nil {
				send(results, result{Status: "failed", Reason: "error", Output: fmt.Sprintf("Invalid handler %s: %v", name, err)})
				continue
			}
			adapters[name] = a
		}
		res := invoke(a, &req)
		res.Leftovers = leftovers()
		send(results, res)
	}
}

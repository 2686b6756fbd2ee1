// Command gotemplate renders an Ollama Modelfile TEMPLATE with Go's own text/template, the way
// Ollama's server does for /api/chat, so tests can compare it with the Jinja chat template.
//
// Standard library only (built at test time by tests/gotemplate.py). What it reproduces, from
// ollama/ollama (template/template.go, api/types.go, server/routes.go ChatHandler, tools/template.go,
// thinking/template.go, server/images.go):
//   - template.Parse: Option("missingkey=zero"), funcs json/currentDate/yesterdayDate/toTypeScriptType,
//     Vars() (every identifier, lower-cased) and the .Messages path of Template.Execute;
//   - collate: consecutive same-role messages merged with "\n\n" (tool messages never), every system
//     message joined into .System;
//   - the data the template sees: templateMessage (Role, Content, Thinking, ToolCalls, ToolName,
//     ToolCallID), templateToolCall (ID, Function{Index, Name, Arguments map with JSON String()}),
//     templateTool (Type, Function{Name, Description, Parameters{Type, Required, Properties map}});
//   - ChatHandler: the Modelfile SYSTEM prepended when the first message is not a system message;
//     Think defaults to true for a thinking-capable template; tools or think on a template without
//     that capability is an error, as Ollama answers it;
//   - capabilities: "tools" when Vars has "tools", "thinking" when thinking.InferTags finds both tags,
//     and the tool-call tag of tools.parseTag;
//   - which template serves: "chat" where server/images.go would prefer the GGUF's Jinja over the
//     TEMPLATE (shouldPreferChatTemplate), else "go".
//
// Input (stdin, JSON): {"template": "...", "system": "...", "chat_template": "...", "cases": [{"messages": [...], "tools": [...],
// "think": true|false|null}]}, messages and tools in Ollama's /api/chat form.
// Output (stdout, JSON): {"vars", "capabilities", "tool_tag", "thinking_tags", "selected", "renders", "errors"}.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// ---------------------------------------------------------------- api types (api/types.go)

type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

func (pt PropertyType) String() string {
	if len(pt) == 0 {
		return ""
	}
	if len(pt) == 1 {
		return pt[0]
	}
	return fmt.Sprintf("%v", []string(pt))
}

// ToolPropertiesMap keeps insertion order, like Ollama's orderedmap-backed type.
type ToolPropertiesMap struct {
	keys []string
	vals map[string]ToolProperty
}

func (t *ToolPropertiesMap) UnmarshalJSON(data []byte) error {
	t.vals = map[string]ToolProperty{}
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil { // {
		return err
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return err
		}
		var v ToolProperty
		if err := dec.Decode(&v); err != nil {
			return err
		}
		key := k.(string)
		if _, seen := t.vals[key]; !seen {
			t.keys = append(t.keys, key)
		}
		t.vals[key] = v
	}
	return nil
}

func (t ToolPropertiesMap) MarshalJSON() ([]byte, error) {
	if t.vals == nil {
		return []byte("null"), nil
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range t.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		vb, err := json.Marshal(t.vals[k])
		if err != nil {
			return nil, err
		}
		b.Write(kb)
		b.WriteByte(':')
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (t *ToolPropertiesMap) ToMap() map[string]ToolProperty {
	if t == nil || t.vals == nil {
		return nil
	}
	out := make(map[string]ToolProperty, len(t.vals))
	for k, v := range t.vals {
		out[k] = v
	}
	return out
}

type ToolProperty struct {
	AnyOf       []ToolProperty     `json:"anyOf,omitempty"`
	Type        PropertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *ToolPropertiesMap `json:"properties,omitempty"`
	Required    []string           `json:"required,omitempty"`
}

func (tp ToolProperty) ToTypeScriptType() string {
	if len(tp.AnyOf) > 0 {
		var types []string
		for _, anyOf := range tp.AnyOf {
			types = append(types, anyOf.ToTypeScriptType())
		}
		return strings.Join(types, " | ")
	}
	if len(tp.Type) == 0 {
		return "any"
	}
	var types []string
	for _, t := range tp.Type {
		types = append(types, mapToTypeScriptType(t))
	}
	return strings.Join(types, " | ")
}

func mapToTypeScriptType(jsonType string) string {
	switch jsonType {
	case "string":
		return "string"
	case "number", "integer":
		return "number"
	case "boolean":
		return "boolean"
	case "array":
		return "any[]"
	case "object":
		return "Record<string, any>"
	case "null":
		return "null"
	default:
		return "any"
	}
}

type ToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties *ToolPropertiesMap `json:"properties"`
}

type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

type ToolCallFunction struct {
	Index int    `json:"index"`
	Name  string `json:"name"`
	// Ollama keeps insertion order here, but the template only ever sees ToMap() (a plain map).
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

func (m *Message) UnmarshalJSON(b []byte) error {
	type Alias Message
	var a Alias
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	*m = Message(a)
	m.Role = strings.ToLower(m.Role)
	return nil
}

// ---------------------------------------------------------------- template data (template/template.go)

type templateTools []templateTool

func (t templateTools) String() string {
	bts, _ := json.Marshal(t)
	return string(bts)
}

type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	bts, _ := json.Marshal(t)
	return string(bts)
}

type templateProperties map[string]ToolProperty

func (t templateProperties) String() string {
	if t == nil {
		return "{}"
	}
	bts, _ := json.Marshal(t)
	return string(bts)
}

func (t templateTool) String() string {
	bts, _ := json.Marshal(t)
	return string(bts)
}

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		if param, ok := v.(ToolProperty); ok {
			return param.ToTypeScriptType()
		}
		if param, ok := v.(*ToolProperty); ok && param != nil {
			return param.ToTypeScriptType()
		}
		return "any"
	},
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func convertTools(tools []Tool) templateTools {
	if tools == nil {
		return nil
	}
	result := make(templateTools, len(tools))
	for i, tool := range tools {
		result[i] = templateTool{
			Type:  tool.Type,
			Items: tool.Items,
			Function: templateToolFunction{
				Name:        tool.Function.Name,
				Description: tool.Function.Description,
				Parameters: templateToolFunctionParameters{
					Type:       tool.Function.Parameters.Type,
					Defs:       tool.Function.Parameters.Defs,
					Items:      tool.Function.Parameters.Items,
					Required:   tool.Function.Parameters.Required,
					Properties: templateProperties(tool.Function.Parameters.Properties.ToMap()),
				},
			},
		}
	}
	return result
}

func convertMessages(messages []*Message) []*templateMessage {
	if messages == nil {
		return nil
	}
	result := make([]*templateMessage, len(messages))
	for i, msg := range messages {
		var toolCalls []templateToolCall
		for _, tc := range msg.ToolCalls {
			toolCalls = append(toolCalls, templateToolCall{
				ID: tc.ID,
				Function: templateToolCallFunction{
					Index: tc.Function.Index, Name: tc.Function.Name, Arguments: templateArgs(tc.Function.Arguments),
				},
			})
		}
		result[i] = &templateMessage{
			Role: msg.Role, Content: msg.Content, Thinking: msg.Thinking, ToolCalls: toolCalls,
			ToolName: msg.ToolName, ToolCallID: msg.ToolCallID,
		}
	}
	return result
}

// ---------------------------------------------------------------- template inspection

func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func vars(t *template.Template) []string {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			for _, v := range identifiers(n) {
				set[strings.ToLower(v)] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

// parseTag is tools.parseTag: the first non-blank text inside the `if .ToolCalls` block, cut at "{".
func parseTag(t *template.Template) string {
	tc := findToolCallNode(t.Tree.Root.Nodes)
	if tc == nil {
		return "{"
	}
	tn := findTextNode(tc.List.Nodes)
	if tn == nil {
		return "{"
	}
	tag := strings.ReplaceAll(string(tn.Text), "\r\n", "\n")
	tag, _, _ = strings.Cut(tag, "{")
	tag = strings.TrimSpace(tag)
	if tag == "" {
		tag = "{"
	}
	return tag
}

func findToolCallNode(nodes []parse.Node) *parse.IfNode {
	isToolCalls := func(n *parse.IfNode) bool {
		for _, cmd := range n.Pipe.Cmds {
			for _, arg := range cmd.Args {
				if f, ok := arg.(*parse.FieldNode); ok && contains(f.Ident, "ToolCalls") {
					return true
				}
			}
		}
		return false
	}
	for _, node := range nodes {
		var lists []*parse.ListNode
		switch n := node.(type) {
		case *parse.IfNode:
			if isToolCalls(n) {
				return n
			}
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.ListNode:
			lists = []*parse.ListNode{n}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		}
		for _, l := range lists {
			if l != nil {
				if r := findToolCallNode(l.Nodes); r != nil {
					return r
				}
			}
		}
	}
	return nil
}

func findTextNode(nodes []parse.Node) *parse.TextNode {
	for _, node := range nodes {
		var lists []*parse.ListNode
		switch n := node.(type) {
		case *parse.TextNode:
			if len(bytes.TrimSpace(n.Text)) == 0 {
				continue
			}
			return n
		case *parse.ListNode:
			if r := findTextNode(n.Nodes); r != nil {
				return r
			}
			continue
		case *parse.IfNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.RangeNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.WithNode:
			lists = []*parse.ListNode{n.List, n.ElseList}
		case *parse.ActionNode:
			return nil
		default:
			continue
		}
		for _, l := range lists {
			if l != nil {
				if r := findTextNode(l.Nodes); r != nil {
					return r
				}
			}
		}
		return nil // Ollama stops at the first if/range/with it enters
	}
	return nil
}

// inferThinkingTags is thinking.InferTags: around a .Thinking inside `range .Messages`, the first and
// last text nodes of the nearest enclosing list.
func inferThinkingTags(t *template.Template) (string, string) {
	var ancestors []parse.Node
	opening, closing := "", ""
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		if n == nil {
			return
		}
		ancestors = append(ancestors, n)
		defer func() { ancestors = ancestors[:len(ancestors)-1] }()
		if f, ok := n.(*parse.FieldNode); ok && len(f.Ident) > 0 && f.Ident[0] == "Thinking" {
			var rng *parse.RangeNode
			for i := len(ancestors) - 1; i >= 0; i-- {
				if r, ok := ancestors[i].(*parse.RangeNode); ok {
					rng = r
					break
				}
			}
			if rng != nil && pipeUsesField(rng.Pipe, "Messages") {
				for i := len(ancestors) - 1; i >= 0; i-- {
					if l, ok := ancestors[i].(*parse.ListNode); ok {
						if tn, ok := l.Nodes[0].(*parse.TextNode); ok {
							opening = strings.TrimSpace(tn.String())
						}
						if tn, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
							closing = strings.TrimSpace(tn.String())
						}
						break
					}
				}
			}
		}
		switch x := n.(type) {
		case *parse.ListNode:
			for _, c := range x.Nodes {
				visit(c)
			}
		case *parse.BranchNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
			if x.List != nil {
				visit(x.List)
			}
			if x.ElseList != nil {
				visit(x.ElseList)
			}
		case *parse.ActionNode:
			visit(x.Pipe)
		case *parse.WithNode:
			visit(&x.BranchNode)
		case *parse.RangeNode:
			visit(&x.BranchNode)
		case *parse.IfNode:
			visit(&x.BranchNode)
		case *parse.TemplateNode:
			if x.Pipe != nil {
				visit(x.Pipe)
			}
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				visit(c)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				visit(a)
			}
		}
	}
	visit(t.Root)
	return opening, closing
}

func pipeUsesField(p *parse.PipeNode, field string) bool {
	if p == nil {
		return false
	}
	for _, c := range p.Cmds {
		for _, a := range c.Args {
			if f, ok := a.(*parse.FieldNode); ok && len(f.Ident) > 0 && f.Ident[0] == field {
				return true
			}
		}
	}
	return false
}

// ---------------------------------------------------------------- which template Ollama serves with

// chatTemplateCapabilities and friends are server/images.go's: a Modelfile TEMPLATE is set aside for
// the GGUF's own Jinja (tokenizer.chat_template) when the Jinja looks more capable, or as capable
// with a tool round trip the TEMPLATE lacks.
func chatTemplateCapabilities(chat string) []string {
	var caps []string
	if strings.Contains(chat, "tools") || strings.Contains(chat, "tool_call") {
		caps = append(caps, "tools")
	}
	thinks := strings.Contains(chat, "<think>") && strings.Contains(chat, "</think>")
	if !thinks {
		thinks = (strings.Contains(chat, "content.split('</think>')") || strings.Contains(chat, `content.split("</think>")`)) &&
			!strings.Contains(chat, "reasoning_content") && !strings.Contains(chat, "<SPECIAL_12>")
	}
	if thinks {
		caps = append(caps, "thinking")
	}
	return caps
}

func chatTemplateHasToolRoundTrip(chat string) bool {
	if !(strings.Contains(chat, "tools") || strings.Contains(chat, "tool_call")) {
		return false
	}
	toolCalls := strings.Contains(chat, "tool_calls") || strings.Contains(chat, "assistant_tool_call")
	if !toolCalls {
		return false
	}
	for _, s := range []string{"tool_response", "tool_results", "role'] == 'tool'", `role'] == "tool"`,
		`role"] == 'tool'`, `role"] == "tool"`, "message.role == 'tool'", `message.role == "tool"`, "ipython"} {
		if strings.Contains(chat, s) {
			return true
		}
	}
	return false
}

func goTemplateHasToolRoundTrip(raw string, v []string) bool {
	if !contains(v, "tools") || !contains(v, "toolcalls") {
		return false
	}
	return strings.Contains(raw, `eq .Role "tool"`) || strings.Contains(raw, "tool_response") ||
		strings.Contains(raw, "TOOL_RESULTS")
}

func sameCapabilities(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for _, c := range a {
		if !contains(b, c) {
			return false
		}
	}
	return true
}

func preferChatTemplate(chat string, goCaps []string, raw string, v []string) bool {
	chatCaps := chatTemplateCapabilities(chat)
	if len(chatCaps) > len(goCaps) {
		return !goTemplateHasToolRoundTrip(raw, v) || chatTemplateHasToolRoundTrip(chat)
	}
	if !sameCapabilities(chatCaps, goCaps) || !contains(chatCaps, "tools") || !contains(goCaps, "tools") {
		return false
	}
	return chatTemplateHasToolRoundTrip(chat) && !goTemplateHasToolRoundTrip(raw, v)
}

// ---------------------------------------------------------------- main

type request struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
	Think    *bool     `json:"think"`
}

type input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	// The GGUF's tokenizer.chat_template: Ollama may serve with it instead of the TEMPLATE.
	ChatTemplate string `json:"chat_template"`
	Cases    []request `json:"cases"`
}

type output struct {
	Vars         []string  `json:"vars"`
	Capabilities []string  `json:"capabilities"`
	ToolTag      string    `json:"tool_tag"`
	ThinkingTags [2]string `json:"thinking_tags"`
	Selected     string    `json:"selected"`
	Renders      []string  `json:"renders"`
	Errors       []string  `json:"errors"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	var in input
	dec := json.NewDecoder(os.Stdin)
	if err := dec.Decode(&in); err != nil {
		fail("bad input: %v", err)
	}
	// Ollama normalises line endings of a Modelfile TEMPLATE before parsing.
	raw := strings.ReplaceAll(in.Template, "\r\n", "\n")
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(raw)
	if err != nil {
		fail("parse: %v", err)
	}
	out := output{Vars: vars(tmpl), Renders: []string{}, Errors: []string{}}
	if !contains(out.Vars, "messages") {
		fail("template does not use .Messages: Ollama would take its legacy .Prompt/.Response path")
	}
	open, closing := inferThinkingTags(tmpl)
	out.ThinkingTags = [2]string{open, closing}
	canThink := open != "" && closing != ""
	canTools := contains(out.Vars, "tools")
	if canTools {
		out.Capabilities = append(out.Capabilities, "tools")
		out.ToolTag = parseTag(tmpl)
	}
	if canThink {
		out.Capabilities = append(out.Capabilities, "thinking")
	}
	goCaps := append([]string{}, out.Capabilities...)
	if contains(out.Vars, "suffix") {
		goCaps = append(goCaps, "insert")
	}
	out.Selected = "go"
	if in.ChatTemplate != "" && preferChatTemplate(in.ChatTemplate, goCaps, raw, out.Vars) {
		out.Selected = "chat"
	}
	for _, req := range in.Cases {
		msgs := req.Messages
		if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
			msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
		}
		var errText string
		if len(req.Tools) > 0 && !canTools {
			errText = "does not support tools"
		}
		think := false
		if req.Think != nil {
			think = *req.Think
			if think && !canThink && errText == "" {
				errText = "does not support thinking"
			}
		} else if canThink {
			think = true
		}
		var b bytes.Buffer
		if errText == "" {
			system, collated := collate(msgs)
			err := tmpl.Execute(&b, map[string]any{
				"System":     system,
				"Messages":   convertMessages(collated),
				"Tools":      convertTools(req.Tools),
				"Response":   "",
				"Think":      think,
				"ThinkLevel": "",
				"IsThinkSet": req.Think != nil || canThink,
			})
			if err != nil {
				errText = err.Error()
			}
		}
		out.Renders = append(out.Renders, b.String())
		out.Errors = append(out.Errors, errText)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fail("encode: %v", err)
	}
}
